"""A run's model, set up in one place for the trainer, ``pact-fast eval``, ``pact-fast export`` and the planner:
the device, the policy and its tokenizer, LoRA adapters (``model.lora``), a frozen lm_head
(``model.freeze_lm_head``), the chat template that carries tools, and the reference policy.

With LoRA (``peft``), the adapters are injected into the Hugging Face model in place: the packed tree scoring,
the fused head and ``linear_logprobs`` run the same model object, only its adapter weights train, and the
reference policy is that model with its adapters switched off (``adapters_off``), never a second copy.

    policy = build_policy(config.model, device, seed)   # -> Policy(model, tokenizer, peft)
    with adapters_off(policy.peft):                      # the base model's log-probs
        ...
"""
import dataclasses
import re
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .chat import resolve_chat_template
from .distributed import decoder_layers
from .files import read_or_raise
from .models import ModelError, load_pretrained, random_qwen3

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DTYPE_KEY = "pact_fast.base_dtype"  # adapter_model.safetensors metadata: the base the adapters trained on


def resolve_device(name):
    """``train.device`` as a torch device; ``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ModelError(f"train.device={name}: this torch ({torch.__version__}) sees {count} CUDA device(s)")
    return device


@dataclass
class Policy:
    """The model a run trains: ``model`` is the Hugging Face causal LM (with the adapters injected when LoRA is on),
    ``peft`` the ``peft.PeftModel`` around it (None without LoRA): what saves, loads, merges and switches off the
    adapters."""

    model: torch.nn.Module
    tokenizer: object
    peft: Optional[torch.nn.Module] = None


def base_dtype(cfg):
    """The dtype ``model`` config ``cfg`` asks of the base weights: bf16 when LoRA freezes them and
    ``cfg.lora.base_dtype`` says so, else None: as the model is made (float32 from a directory, torch's default
    dtype for the built-in model), what a full fine-tune's AdamW updates."""
    return torch.bfloat16 if cfg.lora.enabled and cfg.lora.base_dtype == "bfloat16" else None


def build_model_and_tokenizer(cfg, device, seed):
    """The base causal LM and its tokenizer, without adapters: a local HF directory (``cfg.path``), or the
    built-in tiny Qwen3-shaped model (its weights drawn from ``seed`` in torch's default dtype) on the built-in
    tokenizer; its parameters in ``base_dtype(cfg)`` when that is set (a pretrained model is read in that dtype,
    never held in float32 first), its buffers (RoPE's ``inv_freq``) as made, as ``from_pretrained`` keeps them."""
    dtype = base_dtype(cfg)
    if cfg.path:
        model, tokenizer = load_pretrained(cfg.path, dtype=dtype)  # one-line ModelError: a missing dir or tokenizer
    else:
        from .envs import build_tokenizer

        tokenizer = build_tokenizer()
        model = random_qwen3(len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, max_positions=2048, seed=seed, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=None)
        for p in model.parameters() if dtype is not None else ():  # a tied weight is one parameter: still tied
            p.data = p.data.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def build_policy(cfg, device, seed, *, log=None, training=False):
    """``Policy`` of ``model`` config ``cfg``: the base model (``build_model_and_tokenizer``), then LoRA adapters
    when ``cfg.lora.enabled`` (loaded from ``cfg.lora.adapter`` when given, else freshly initialised: B = 0, so
    the policy starts equal to the base), then a frozen lm_head when ``cfg.freeze_lm_head``. With ``training``
    (the trainer's policy) in training mode whatever made it (``from_pretrained`` gives eval mode, where LoRA's
    dropout and activation checkpointing do nothing; rollouts switch to eval mode themselves), and a model whose
    config asks for attention dropout, which tree attention does not implement, is refused; otherwise as made.
    The LoRA set-up is checked on the model's skeleton (``check_lora``) before any weight is loaded."""
    check_lora(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, device, seed)
    peft_model = apply_lora(model, cfg.lora, seed=seed, log=log) if cfg.lora.enabled else None
    if cfg.freeze_lm_head:
        freeze_lm_head(model, log=log)
    if training:
        check_attention_dropout(model)
        model.train()
    return Policy(model, tokenizer, peft_model)


def without_start_adapters(cfg):
    """``model`` config ``cfg`` for a resumed run: ``lora.adapter`` unset, since the checkpoint holds the adapters
    (the ones the run started from may be gone: another run's checkpoint, pruned by its keep_last)."""
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, adapter=None))


# dropout settings a causal LM's forward never reads: a classification head's, GPT-2's double-heads' summary
_NOT_LM_DROPOUTS = frozenset({"classifier_dropout", "summary_first_dropout"})


def _dropouts(config, attention):
    """``{key: rate}`` of the dropout settings in ``config`` (a text config) that ask for dropout: the attention
    ones (``attention``: ``attention_dropout`` of Llama and Qwen, ``attn_pdrop`` of GPT-2 and GPTBigCode, 0.1 by
    default, BioGPT's ``attention_probs_dropout_prob``, ``attn_dropout``...), or every other (``resid_pdrop``,
    ``embd_pdrop``, ``hidden_dropout``, OPT's ``dropout`` and ``layerdrop``...)."""
    rates = {}
    for key in sorted(config.to_dict()):
        value = getattr(config, key, None)
        if ("drop" in key and key not in _NOT_LM_DROPOUTS and bool(re.match(r"(attn|attention)_.*drop", key)) ==
                attention and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            rates[key] = value
    return rates


def check_attention_dropout(model):
    """A ``ModelError`` (one line) when ``model``'s config asks for attention dropout, under any of its names
    (``_dropouts``): packed scoring's tree attention does not implement it, and a model in training mode would
    apply it (the first step's scoring would raise)."""
    rates = _dropouts(model.config.get_text_config(), attention=True)
    if rates:
        said = ", ".join(f"{k}={v:g}" for k, v in rates.items())
        zero = ", ".join(f'"{k}": 0.0' for k in rates)
        raise ModelError(f"{type(model).__name__}: its config has {said}, which tree attention does not implement; "
                         f"set {zero} in its config.json to train it without")


def check_no_dropout(model, why, options=None):
    """A ``ModelError`` (one line) when ``model``'s config asks for dropout outside attention (``_dropouts``), or
    ``options`` (``{option: rate}``: ``model.lora.dropout``) do, and the run compares its log-probs across passes
    (``why``, a list of reasons: several update epochs, a KL to a reference, importance weights to a rollout
    engine's log-probs): in training mode each pass draws its own dropout, so those ratios come out random where
    the method has them exact."""
    rates = _dropouts(model.config.get_text_config(), attention=False)
    options = {k: v for k, v in (options or {}).items() if v > 0}
    if not rates and not options:
        return
    in_config = ", ".join(f'"{k}": 0.0' for k in rates)
    fixes = ([f"set {in_config} in its config.json"] if rates else []) + \
        ([f"set {', '.join(f'{k}=0' for k in options)}"] if options else [])
    said = ", ".join(f"{k}={v:g}" for k, v in {**rates, **options}.items())
    raise ModelError(f"{type(model).__name__}: dropout {said}: training-mode dropout makes each pass's log-probs a "
                     f"random draw, which this run compares across passes ({'; '.join(why)}); {'; '.join(fixes)}")


def enable_checkpointing(model):
    """Activation checkpointing of ``model``'s decoder layers, non-reentrant: a reentrant checkpoint whose inputs
    need no gradient (frozen embeddings under LoRA or a frozen tied head) would silently drop the gradients of the
    layers inside it. transformers >= 5.25 names it ``activation_checkpointing_enable`` (its
    ``gradient_checkpointing_enable`` warns and goes in v6); older ones have only the second."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze_lm_head(model, log=None):
    """Stop training the lm_head weight: the log-prob ops then skip its gradient (two GEMMs instead of three).
    With tied embeddings the input embedding is the same tensor and is frozen with it (said in ``log``)."""
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    if head.bias is not None:
        head.bias.requires_grad_(False)
    if log and model.get_input_embeddings().weight is head.weight:
        log("[pact_fast] model.freeze_lm_head: the embeddings are tied to the lm_head and are frozen too")


# ---------------------------------------------------------------- LoRA


def _router_width(config):
    """The number of experts of a mixture-of-experts config (its router is a linear layer that LoRA leaves alone
    by default), or None."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_lora_targets(model):
    """The linear layers LoRA adapts by default: every ``nn.Linear`` inside the decoder layers, by its attribute
    name (Llama/Qwen: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); never the lm_head (the
    log-prob ops read its weight directly) and never a mixture-of-experts router."""
    experts = _router_width(model.config)
    names = set()
    try:
        layers = decoder_layers(model)
    except ValueError as exc:
        raise ModelError(f"{exc}: nowhere to put LoRA adapters") from None
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and module.out_features != experts:
                names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ModelError(f"{type(model).__name__}: its decoder layers have no linear layers for LoRA "
                         "(model.lora.target_modules names the modules to adapt)")
    return sorted(names)


def lora_targets(model, lora_cfg):
    """The module names LoRA adapts: ``lora_cfg.target_modules``, checked against ``model``, or the default.
    Raises ``ModelError`` (one line) for a name that matches no module, for the lm_head (its LoRA delta would
    never reach the log-prob ops, which read the head weight), for an input embedding tied to the lm_head (a
    merge would fold its delta into the head as well) and for a module type peft cannot adapt."""
    if not lora_cfg.target_modules:
        return default_lora_targets(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    leaves = {}
    for name, module in model.named_modules():
        if name:
            leaves.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    supported = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    for target in lora_cfg.target_modules:
        modules = leaves.get(target)
        if not modules:
            raise ModelError(f"model.lora.target_modules: {target!r} matches no module of {type(model).__name__}: "
                             "target modules are module names such as q_proj, not paths, regexes or all-linear "
                             "(empty = every linear layer of the decoder layers: "
                             f"{', '.join(default_lora_targets(model))})")
        if any(m is head for m in modules):
            raise ModelError(f"model.lora.target_modules: {target!r} is the lm_head, which LoRA cannot adapt here: "
                             "the log-prob ops read the head weight directly (use model.freeze_lm_head, or train it "
                             "fully without LoRA)")
        if any(m is embed for m in modules) and embed.weight is head.weight:
            raise ModelError(f"model.lora.target_modules: {target!r} is the input embedding, tied to the lm_head: its "
                             "LoRA would change the inputs only, yet merging it would change the lm_head too (adapt "
                             "the decoder's linear layers, or use an untied model)")
        unsupported = sorted({type(m).__name__ for m in modules if not isinstance(m, supported)})
        if unsupported:
            raise ModelError(f"model.lora.target_modules: {target!r} is a {', '.join(unsupported)}, which peft's LoRA "
                             f"does not adapt; adapt linear layers such as {', '.join(default_lora_targets(model))}")
    return list(lora_cfg.target_modules)


def _skeleton(cfg):
    """The model of ``cfg`` on the meta device (no weights read or allocated), for checks before loading."""
    from transformers import AutoModelForCausalLM

    from .envs import build_tokenizer
    from .models import read_model_config

    if cfg.path:
        config = read_model_config(cfg.path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        return random_qwen3(len(build_tokenizer()), hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                            max_positions=2048, seed=0, tie_word_embeddings=True)


def check_lora(cfg):
    """Refuse a LoRA set-up the model cannot take, before its weights load: peft missing, target modules that do not
    exist or cannot be adapted, an adapter directory that is not one, was made with other settings or with a peft
    option pact_fast does not implement (``check_adapter_options``)."""
    lora = cfg.lora
    if not lora.enabled:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelError("model.lora.enabled=true needs peft: pip install 'pact_fast[lora]' (or pip install peft)") \
            from None
    targets = lora_targets(_skeleton(cfg), lora)
    if lora.adapter:
        saved = _adapter_config(lora.adapter)
        check_adapter_options(lora.adapter, saved)
        wanted = {"r": lora.r, "lora_alpha": lora.alpha}
        saved_targets = saved.get("target_modules") or []
        if not isinstance(saved_targets, str):  # a str is peft's regex: the adapter's tensors tell what it adapts
            wanted["target_modules"] = sorted(set(targets))
        have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
                "target_modules": sorted(set(saved_targets))}
        differ = [f"{k}: config {v!r}, adapter {have[k]!r}" for k, v in wanted.items() if have[k] != v]
        if differ:
            raise ModelError(f"model.lora.adapter={lora.adapter}: made with other LoRA settings ({'; '.join(differ)})")


# Options of an adapter_config.json that do not change the adapted model once its weights are loaded: where and
# how it was made, its training-time dropout, runtime placement, options that act only with another (refused) one
# (layers_pattern with layers_to_transform, qalora_group_size with use_qalora), and initialisations that leave
# the base weights as they are (_NEUTRAL_INITS).
_ADAPTER_NEUTRAL = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode", "lora_dropout", "fan_in_fan_out", "megatron_core", "runtime_config",
                    "layers_pattern", "qalora_group_size")
_NEUTRAL_INITS = (True, False, "gaussian")


def check_adapter_options(path, saved):
    """Refuse (``ModelError``, one line) an adapter whose ``adapter_config.json`` (``saved``) uses a peft option
    that pact_fast's LoRA does not implement: rsLoRA's scale, per-module ranks or alphas, DoRA, trained biases,
    fully trained modules, an initialisation that rewrote the base weights (PiSSA, OLoRA, LoftQ), another PEFT
    method... Loaded as plain LoRA (scale alpha / r on every module), such an adapter would give another model.
    Only r, lora_alpha and target_modules (checked against the config) and the options of ``_ADAPTER_NEUTRAL``
    may differ from peft's defaults."""
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    if saved.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"model.lora.adapter={path}: a peft {saved['peft_type']} adapter; pact_fast trains and "
                         "loads LoRA adapters only")
    for key, value in sorted(saved.items()):
        if key in ("r", "lora_alpha", "target_modules") + _ADAPTER_NEUTRAL:
            continue
        if key == "init_lora_weights" and value in _NEUTRAL_INITS:
            continue
        if value in (None, False, {}, []) or value == defaults.get(key):  # unset, or a newer peft's option unset
            continue
        raise ModelError(f"model.lora.adapter={path}: made with peft's {key}={value!r}, which pact_fast's LoRA "
                         "does not implement (plain LoRA: r, lora_alpha, lora_dropout and target_modules by "
                         "module name)")


def _adapter_config(path):
    """The settings of ``path``'s ``adapter_config.json``; a ``ModelError`` (one line, naming the file) when there is
    none or it is damaged (cut short, not JSON, not a mapping of settings)."""
    import json

    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise ModelError(f"model.lora.adapter={path}: no {ADAPTER_CONFIG} (expected a LoRA checkpoint of a pact-fast "
                         "run, or a peft adapter directory)")
    saved = read_or_raise(lambda: json.loads(file.read_text()), lambda reason: ModelError(
        f"{file}: cannot be read ({reason}); the adapter's settings are damaged"))
    if not isinstance(saved, dict):
        raise ModelError(f"{file}: not a mapping of LoRA settings (got a JSON {type(saved).__name__}); the adapter's "
                         "settings are damaged")
    return saved


@contextmanager
def _targets_as_named():
    """peft on transformers 5 rewrites LoRA targets named as transformers 4's mixture-of-experts layers were
    (``gate_proj``, ``up_proj``, ``down_proj``; Mixtral's ``w1``..``w3``) for DeepSeek-V2/V3, GLM-4-MoE, Ernie
    4.5-MoE... into ``target_parameters`` of the fused experts (with ``rank_pattern`` and ``alpha_pattern`` doubling
    r and alpha there), dropping them from ``target_modules``: the dense MLP layers and shared experts named so got
    no adapters, the routed experts got some, and the run's adapter_config.json was refused when read back
    (``check_adapter_options``). The rewrite is for adapters trained on transformers 4; pact_fast makes and reads its
    adapters by its own module names, so it is off for the block (a peft without it: nothing to do)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        conversion = None
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is not None:
        conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if original is not None:
            conversion.convert_peft_config_for_transformers = original


def apply_lora(model, lora_cfg, seed=0, log=None):
    """Inject LoRA adapters into ``model`` in place (``peft.get_peft_model``): the base weights freeze, the
    adapters train. Their initialisation (A random, B = 0) is drawn from ``seed`` whatever the global random state
    (which it leaves as it was): under torchrun every rank draws the same adapters, and a run's are its seed's.
    Loads ``lora_cfg.adapter``'s weights when given. Returns the ``PeftModel``; ``model`` itself stays the object
    to score and sample with."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, lora_cfg)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # peft asks transformers 5 a deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)  # peft inits the adapters on the model's device
            with _targets_as_named():
                peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"model.lora: peft cannot adapt {type(model).__name__} ({' '.join(str(exc).split())})") \
            from None
    made = peft_model.peft_config["default"]
    if (sorted(made.target_modules) != sorted(set(targets)) or getattr(made, "target_parameters", None)
            or made.rank_pattern or made.alpha_pattern):
        raise ModelError(f"model.lora: peft re-targeted the LoRA of {type(model).__name__} (target_modules "
                         f"{sorted(made.target_modules)}, target_parameters {getattr(made, 'target_parameters', None)}"
                         f", asked {sorted(set(targets))}), which pact_fast's LoRA does not implement")
    if lora_cfg.adapter:
        load_adapter_weights(peft_model, lora_cfg.adapter)
        made_on, base = _adapter_config(lora_cfg.adapter).get("base_model_name_or_path"), model.name_or_path
        if log and made_on and base and Path(made_on).name.lower() != Path(base).name.lower():
            log(f"[pact_fast] model.lora.adapter={lora_cfg.adapter} was made on {made_on}, this base model is {base}: "
                "an adapter of another model of the same shape loads without an error, and adapts this one")
        trained_on, here = _adapter_metadata(lora_cfg.adapter).get(BASE_DTYPE_KEY), _base_dtype_name(model)
        if log and trained_on and trained_on != here:
            log(f"[pact_fast] model.lora.adapter={lora_cfg.adapter} trained on a {trained_on} base, this base is "
                f"{here} (model.lora.base_dtype): the adapted model's log-probs are not quite the ones it trained on")
    if log:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"[pact_fast] LoRA r={lora_cfg.r} alpha={lora_cfg.alpha:g} on {', '.join(targets)}: {trainable:,} "
            f"trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return peft_model


@contextmanager
def adapters_off(peft_model):
    """The base model for the duration of the block: the LoRA adapters are switched off (``peft_model`` None: the
    model as it is)."""
    with peft_model.disable_adapter() if peft_model is not None else nullcontext():
        yield


class AdaptersOffScorer:
    """A scorer (``PackedScorer``) called with the adapters switched off: the reference policy of a LoRA run,
    sharing every weight with the policy."""

    def __init__(self, scorer, peft_model):
        self.scorer, self.peft = scorer, peft_model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.peft):
            return self.scorer(*args, **kwargs)


def adapter_key_map(peft_model, names):
    """``{saved key: model key}`` for the adapter parameters ``names`` of the causal LM inside ``peft_model``
    (``model.layers.0.self_attn.q_proj.lora_A.default.weight``): peft's own file naming
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), found by passing each name's index
    through ``peft.get_peft_model_state_dict``."""
    from peft import get_peft_model_state_dict

    marked = {f"base_model.model.{n}": torch.tensor(i) for i, n in enumerate(names)}
    saved = get_peft_model_state_dict(peft_model, state_dict=marked)
    return {key: names[int(index)] for key, index in saved.items()}


def adapter_names(model):
    """Names (in ``model``) of the trainable adapter parameters."""
    return [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def save_adapter(peft_model, model_state, directory):
    """Write the adapters of ``model_state`` (the causal LM's full state dict, e.g. gathered from FSDP shards) to
    ``directory`` in peft's format (``adapter_config.json``, ``adapter_model.safetensors``), loadable with
    ``peft.PeftModel.from_pretrained`` (which, under transformers 5, re-targets a mixture-of-experts model's dense
    MLP adapters: ``read_adapter`` and ``export_merged`` do not)."""
    from safetensors.torch import save_file

    model = peft_model.base_model.model
    key_map = adapter_key_map(peft_model, adapter_names(model))
    tensors = {saved: model_state[name].detach().cpu().contiguous() for saved, name in key_map.items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(directory))
    save_file(tensors, str(Path(directory) / ADAPTER_WEIGHTS), metadata={BASE_DTYPE_KEY: _base_dtype_name(model)})


def _base_dtype_name(model):
    """The dtype of ``model``'s frozen base weights (its first floating parameter outside the adapters), as
    ``model.lora.base_dtype`` spells it: ``"float32"``, ``"bfloat16"``."""
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point())
    return str(dtype).removeprefix("torch.")


def _adapter_metadata(directory):
    """The string metadata of ``directory``'s adapter weights file ({} for one without)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), "pt") as f:
        return f.metadata() or {}


def read_adapter(peft_model, directory):
    """The adapter tensors of ``directory`` keyed by their parameter names in the causal LM; a ``ModelError``
    when the directory's adapters do not match the model's (missing or extra tensors, other shapes)."""
    from safetensors.torch import load_file

    file = Path(directory) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ModelError(f"{directory}: no {ADAPTER_WEIGHTS}")
    saved = read_or_raise(lambda: load_file(str(file)), lambda reason: ModelError(
        f"{file}: cannot be read ({reason}); the adapter file is damaged"))
    model = peft_model.base_model.model
    key_map = adapter_key_map(peft_model, adapter_names(model))
    missing, extra = sorted(set(key_map) - set(saved)), sorted(set(saved) - set(key_map))
    if missing or extra:
        raise ModelError(f"{directory}: its adapters do not match the model's (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    params = dict(model.named_parameters())
    state = {}
    for key, name in key_map.items():
        if saved[key].shape != params[name].shape:
            raise ModelError(f"{directory}: {key} has shape {tuple(saved[key].shape)}, the model's "
                             f"{tuple(params[name].shape)}")
        state[name] = saved[key]
    return state


def load_adapter_weights(peft_model, directory):
    """Copy ``directory``'s adapter weights into ``peft_model`` (single process)."""
    state = read_adapter(peft_model, directory)
    params = dict(peft_model.base_model.model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merged_model(policy):
    """A plain Hugging Face model with the adapters folded into the base weights (``merge_and_unload``)."""
    if policy.peft is None:
        raise ModelError("the model has no LoRA adapters to merge")
    return policy.peft.merge_and_unload()


def export_merged(config, out, log=print):
    """Write ``config``'s LoRA policy (the adapters of ``model.lora.adapter`` on ``model.path``) with the adapters
    folded into the weights, as a plain Hugging Face model directory ``out`` (model, config, and the tokenizer
    the adapters were trained with), which ``transformers`` loads without peft. Written under a temporary name,
    then renamed; a write that fails (a full disk: a one-line ``ModelError``) or a Ctrl-C removes the temporary
    directory. The merge runs in float32 whatever ``model.lora.base_dtype`` trained on: a bf16 base is cast up
    (exactly) first, so the merged weights are the base the adapters trained on plus their delta, without a bf16
    rounding of the sum; the directory holds float32 weights either way. Returns ``out``."""
    import shutil

    from transformers import AutoTokenizer

    lora = config.model.lora
    if not (lora.enabled and lora.adapter):
        raise ModelError("nothing to merge: the run has no LoRA adapters (model.lora.enabled is false); its "
                         "checkpoints are full models that transformers loads as they are")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelError(f"--merge {out} is a file; export into a new directory")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; export into a new directory")
    policy = build_policy(config.model, torch.device("cpu"), config.train.seed)
    policy.model.to(torch.float32)
    tokenizer = policy.tokenizer
    if any((Path(lora.adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(lora.adapter), local_files_only=True)
    merged = merged_model(policy)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException as exc:  # a Ctrl-C or a full disk: no half-written model (a 7B's is 28 GB) left behind
        shutil.rmtree(tmp, ignore_errors=True)
        from .checkpoint import _disk_error

        if isinstance(exc, Exception) and _disk_error(exc):
            reason = " ".join(str(exc).split())[:200]
            raise ModelError(f"--merge {out}: the merged model could not be written ({type(exc).__name__}: "
                             f"{reason}); is the disk full?") from exc
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log(f"[pact_fast] merged {lora.adapter} into {config.model.path or 'the built-in model'}: {out}")
    return out


# ---------------------------------------------------------------- chat template


def fit_chat_template(config, tokenizer, examples, log=print):
    """With a pretrained ``model.path``: make its tokenizer's chat template carry tools
    (``chat.resolve_chat_template`` per ``model.chat_template``; reasoning, and text in turns that call tools, are
    required when any example's trace has some); a template it cannot use is a ``ModelError``. The built-in
    tokenizer's own template carries tools already."""
    if config.model.path:
        reasoning = any(m.get("reasoning_content") for ex in examples for m in ex.trace)
        call_text = any((m.get("content") or "").strip() and m.get("tool_calls") for ex in examples for m in ex.trace)
        try:
            resolve_chat_template(tokenizer, config.model.chat_template, config.rollout.tool_call_format,
                                  reasoning=reasoning, call_text=call_text, log=log)
        except ValueError as exc:  # a template the run cannot train with: one line, as a model problem
            raise ModelError(f"model.chat_template={config.model.chat_template}: {exc}") from None


__all__ = ["Policy", "build_policy", "base_dtype", "build_model_and_tokenizer", "resolve_device", "freeze_lm_head",
           "check_attention_dropout", "check_no_dropout", "without_start_adapters", "default_lora_targets",
           "lora_targets", "check_lora", "check_adapter_options", "apply_lora", "adapters_off", "AdaptersOffScorer",
           "save_adapter", "read_adapter", "load_adapter_weights", "merged_model", "export_merged", "fit_chat_template"]
