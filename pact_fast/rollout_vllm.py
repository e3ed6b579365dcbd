"""Rollouts from a vLLM engine: ``VLLMRolloutEngine`` (``rollout.engine=vllm``), and ``make_rollout_engine``,
which picks the engine a run's config asks for.

The episode loop, the chat rendering (``pact_fast.chat``) and the tool-call parsing (``pact_fast.toolcalls``)
are ``HFRolloutEngine``'s own: only the sampling of one assistant turn changes. Each turn, every live episode
of the step is one request (its prompt and response so far, as token ids), all in one ``LLM.generate`` call;
prefix caching spares re-filling the conversation turn after turn. Sampling matches the HF engine's:
temperature, top-p, ``max_new_tokens`` per turn, a stop on the tokenizer's end-of-turn token only, and one seed
per request drawn from ``generator`` (which the trainer reseeds every step). The behaviour log-probs are the
engine's, ``log softmax(logits / T)`` of the token before top-p truncation, as the HF engine records them and the
trainer scores: the temperature is applied inside the engine's model (its logits processor's ``scale`` divided by
``T``, set in the worker whenever ``rollout.temperature`` changes), vLLM samples at temperature 1 (0: greedy) with
top-p, and reports ``logprobs_mode="raw_logprobs"`` (``SamplingParams(logprobs=0)``). vLLM's own temperature
would not do: its processed log-probs are renormalised over the top-p nucleus (0.5 nats off at top_p=0.5), its
raw ones are at T = 1, and so are its greedy ones in either mode.

Weights: the engine starts from a copy of the training model saved at construction (no tokenizer: token ids
go in and out), and before every ``rollout`` whose model changed (parameter versions) the training model's
weights are written to one shared-memory file and loaded by the engine's worker in place
(``reload_weights`` through ``collective_rpc``), the prefix cache is dropped, and a fingerprint is checked:
the engine's log-probs of a fixed probe sequence against the training model's, to a dtype-aware tolerance.
A failed sync or a dead engine raises ``RolloutEngineError``: a run never samples from stale weights.

Under torchrun (FSDP2) every rank runs its own engine and samples the prompt groups it owns (the trainer's
``distributed.shard_list`` split, as with the HF engine). The trainer gathers the sharded parameters into the
rank's unsharded rollout copy (``distributed.sync_rollout_weights``: ``full_tensor()`` parameter by parameter, in
the same order on every rank) and each rank pushes that copy into its own engine through a shared-memory file
with the rank in its name. The engine's process is a plain single-process engine: torchrun's variables are
hidden from it, and on CUDA it sees only the rank's GPU. Each rank checks its own engine; the ranks then share
their outcome (``distributed.gather_errors``), so a failed sync or probe on any rank stops every rank with that
rank's message, and no rank is left waiting in a collective (nor by a Ctrl-C during the sync: its raise waits for
that exchange, ``distributed.signals_deferred``).

Sleep mode (``rollout.vllm_sleep``, CUDA only: vLLM has none on CPU): after each rollout the engine sleeps
(level 2: its KV cache and weights are freed while the trainer updates); before the next it wakes its weights,
takes the trainer's weights (every time: level 2 discarded them), wakes its KV cache, then checks the probe.
"""
import copy
import math
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from . import distributed as dist
from .rollout import HFRolloutEngine, RolloutConfig

INSTALL_HINT = ('pip install -e ".[vllm]" (a separate virtualenv: vLLM pins its own transformers), then, on CPU, '
                "pip uninstall -y torchvision torchaudio torchcodec")
# max |engine - trainer| log-prob on the probe sequence accepted after a sync, per engine dtype. Measured on
# SmolLM2-135M, CPU: fp32 ~1e-5; bf16 0.14-0.29 from its rounding alone, so in bf16 the probe catches only gross
# failures. The checksum covers the bytes the worker read, not what vLLM's loader kept: a tensor the engine's model
# has no place for is dropped without a word, hence the parameter check at start (_worker_unplaced)
PROBE_ATOL = {torch.float32: 2e-3, torch.bfloat16: 0.5, torch.float16: 0.25}
PROBE_TOKENS = 64  # tokens of the probe sequence (the first prompt the engine sees, cut)
DEFAULT_IS_CAP = 2.0  # rollout.is_cap when unset and the engine is vLLM
SLEEP_LEVEL = 2  # vLLM's level that frees weights and KV cache (level 1 would keep a CPU copy of old weights)
WAKE_WEIGHTS, WAKE_KV_CACHE = ["weights"], ["kv_cache"]  # LLM.wake_up tags: weights first, KV cache after the sync
# what torchrun sets for its workers: hidden from the engine's process, which is a world of its own
# (TORCHELASTIC_USE_AGENT_STORE would make a tcp:// store of the engine's a client of a server nobody runs)
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE")
# vLLM's CPU platform sizes the KV cache from this (GiB) over kv_cache_memory_bytes: hidden, so that
# rollout.vllm_kv_cache_gb (or, at 0, vllm_gpu_memory_utilization) is what sizes it
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"


class RolloutEngineError(RuntimeError):
    """The rollout engine is unusable (missing, dead) or holds weights other than the trainer's."""


def is_cap(config):
    """The truncated importance sampling cap a run uses: ``rollout.is_cap``, or when unset ``DEFAULT_IS_CAP``
    with ``rollout.engine=vllm`` and 0 (off) with the HF engine, whose log-probs are the trainer's own."""
    if config.is_cap is not None:
        return config.is_cap
    return DEFAULT_IS_CAP if config.engine == "vllm" else 0.0


def vllm_sleep(config):
    """Whether the engine sleeps between rollouts: ``rollout.vllm_sleep``, or when unset on where the engine runs
    on CUDA and off on CPU (vLLM has no sleep mode there)."""
    return config.vllm_sleep if config.vllm_sleep is not None else torch.cuda.is_available()


def import_vllm():
    """``(LLM, SamplingParams)``, or a one-line ``RolloutEngineError`` naming what to install."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise RolloutEngineError(f"rollout.engine=vllm: vLLM is not importable ({exc}); {INSTALL_HINT}") from None
    except Exception as exc:  # e.g. pip's CUDA torchvision: "operator torchvision::nms does not exist"
        reason = " ".join(str(exc).split())[:200]
        raise RolloutEngineError(f"rollout.engine=vllm: vLLM is installed but fails to import ({reason}); "
                                 f"{INSTALL_HINT}") from None
    return LLM, SamplingParams


def make_rollout_engine(model, tokenizer, config: RolloutConfig, seed=0):
    """The engine ``config.engine`` names: ``HFRolloutEngine`` (hf) or ``VLLMRolloutEngine`` (vllm)."""
    if config.engine == "hf":
        return HFRolloutEngine(model, tokenizer, config, seed=seed)
    return VLLMRolloutEngine(model, tokenizer, config, seed=seed)


def engine_weights(model):
    """``(name, tensor)`` of every parameter the engine's model takes, as the plain Hugging Face model names them
    (tied ones once): with peft's LoRA layers injected (``model.lora``), each adapted layer's base weight with its
    active adapters' delta folded in (float32, as ``peft``'s merge computes it) under the base layer's own name,
    and no adapter tensor: the engine samples from the adapted policy without knowing of LoRA."""
    from_lora = {}  # module path -> peft LoRA layer
    for path, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            from_lora[path] = module
    for name, p in model.named_parameters():
        path, _, leaf = name.rpartition(".base_layer.")
        if not path:
            if not any(part.startswith("lora_") for part in name.split(".")):
                yield name, p.detach()
            continue
        layer, value = from_lora[path], p.detach()
        if leaf == "weight" and not layer.disable_adapters:
            value = value.float()
            for adapter in layer.active_adapters:
                value = value + layer.get_delta_weight(adapter).detach().float()
        yield f"{path}.{leaf}", value


def save_for_engine(model, directory):
    """The model as the engine's starting checkpoint: its config (and generation config) and its parameters,
    tied ones once, in one safetensors file. Written by every rank: ``save_pretrained`` writes on rank 0 only
    under torch.distributed. A config without ``architectures`` (a model made with ``from_config``, as the
    built-in one) gets the model's class: vLLM took such a model for an embedding model and failed to start. A
    LoRA model's adapters are folded in (``engine_weights``). Returns the names of the tensors written."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = config.architectures or [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tensors = {name: t.to("cpu").contiguous() for name, t in engine_weights(model)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return list(tensors)


@contextmanager
def engine_process_env():
    """The environment the engine (its config and its process) starts with: without ``KV_SPACE_ENV``; under
    torchrun without torchrun's variables (the engine is a world of its own, not a member of the trainer's) and on
    CUDA with only the rank's own GPU visible. The trainer's environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES", KV_SPACE_ENV)}
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        os.environ.pop(KV_SPACE_ENV, None)
        if dist.is_distributed():
            if torch.cuda.is_available():
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
                os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]
            for key in TORCHRUN_ENV:
                os.environ.pop(key, None)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker_load(path, size, meta):
    """The callable ``collective_rpc`` runs in the engine's worker (``self``): read the weights ``meta``
    ``[(name, dtype, shape, byte offset)]`` from the shared file ``path``, load them in place, and rebuild the
    CPU GEMM handles of layers that got no weights of their own (a tied lm_head keeps a packed copy of the old
    embedding otherwise). Returns the float64 sum of every tensor it read, for the trainer to compare."""

    def load(self):
        import torch

        buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
        total = 0.0

        def weights():
            nonlocal total
            for name, dtype, shape, offset in meta:
                n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                tensor = buf[offset:offset + n].view(dtype).view(shape)
                total += float(tensor.double().sum())
                yield name, tensor

        self.reload_weights(weights_iterator=weights())
        model = self.model_runner.get_model()
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if hasattr(module, "cpu_linear") and getattr(module, "weight", None) is not None \
                    and module.weight.numel() > 0 and method is not None:
                method.process_weights_after_loading(module)
        return total

    return load


def _worker_unplaced(names):
    """The callable ``collective_rpc`` runs in the engine's worker (``self``): those of the trainer's parameter
    ``names`` whose module the engine's model has, without that parameter (vLLM's loader drops such a tensor
    without a word). Names of modules the engine fuses or renames (``q_proj`` into ``qkv_proj``) are not judged."""

    def unplaced(self):
        modules = dict(self.model_runner.get_model().named_modules())
        return [name for name in names if (path := name.rpartition(".")[0]) in modules
                and getattr(modules[path], name.rpartition(".")[2], None) is None]

    return unplaced


def _worker_set_temperature(temperature):
    """The callable ``collective_rpc`` runs in the engine's worker (``self``): the logits of the model's
    ``LogitsProcessor`` modules divided by ``temperature`` from now on (their own scale, e.g. a model's
    ``logit_scale``, kept as the base). Returns how many modules it scaled."""

    def scale(self):
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        found = [m for m in self.model_runner.get_model().modules() if isinstance(m, LogitsProcessor)]
        for module in found:
            module.pact_base_scale = getattr(module, "pact_base_scale", module.scale)
            module.scale = module.pact_base_scale / temperature
        return len(found)

    return scale


class VLLMRolloutEngine(HFRolloutEngine):
    """``HFRolloutEngine``'s episode loop with turns sampled by a colocated vLLM engine (module docstring).

    Args:
        model: the training model (its current weights are pushed into the engine before each rollout).
        tokenizer: its tokenizer (rendering and parsing stay on this side; the engine sees token ids).
        config: ``RolloutConfig`` (``engine="vllm"`` and the ``vllm_*`` options).
        seed: seed of ``generator``, from which every request's sampling seed is drawn.
    """

    def __init__(self, model, tokenizer, config=None, seed=0):
        super().__init__(model, tokenizer, config or RolloutConfig(engine="vllm"), seed=seed)
        cfg = self.config
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc sends a callable
        LLM, self._SamplingParams = import_vllm()
        if cfg.vllm_tensor_parallel_size > 1 and not torch.cuda.is_available():
            raise RolloutEngineError(f"rollout.vllm_tensor_parallel_size={cfg.vllm_tensor_parallel_size} needs "
                                     "that many GPUs; this machine has none")
        if cfg.vllm_tensor_parallel_size > 1 and dist.is_distributed():
            raise RolloutEngineError(f"rollout.vllm_tensor_parallel_size={cfg.vllm_tensor_parallel_size} under "
                                     "torchrun is not implemented: each rank's engine runs on the rank's own GPU "
                                     "(tensor_parallel_size=1)")
        self.sleep = vllm_sleep(cfg)
        self.rank = dist.rank()
        dtype = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.vllm_dtype]
        self.dtype = dtype
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the weight file in memory, where there is one
        self._dir = Path(tempfile.mkdtemp(prefix=f"pact_fast_vllm_rank{self.rank}_", dir=shm))
        weakref.finalize(self, shutil.rmtree, str(self._dir), True)  # the weight file goes at exit, close() or not
        self._shm = None
        try:
            names = save_for_engine(model, self._dir / "model")
            kv = dict(kv_cache_memory_bytes=int(cfg.vllm_kv_cache_gb * 2 ** 30)) if cfg.vllm_kv_cache_gb else {}
            max_len = min(cfg.vllm_max_model_len, self.max_len)  # the model's positions (HFRolloutEngine)
            self.max_len = max_len
            try:
                with engine_process_env():
                    self.llm = LLM(model=str(self._dir / "model"), skip_tokenizer_init=True,
                                   dtype=str(dtype).split(".")[1], seed=seed, enable_prefix_caching=True,
                                   logprobs_mode="raw_logprobs", max_model_len=int(max_len),
                                   enforce_eager=cfg.vllm_enforce_eager,
                                   tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                   enable_sleep_mode=self.sleep, **kv)
            except Exception as exc:
                shutil.rmtree(self._dir, ignore_errors=True)
                reason = " ".join(str(exc).split())[:300]
                raise RolloutEngineError(f"rollout.engine=vllm: the engine failed to start ({type(exc).__name__}: "
                                         f"{reason})") from None
        finally:
            shutil.rmtree(self._dir / "model", ignore_errors=True)
        unplaced = self._call(lambda: self.llm.collective_rpc(_worker_unplaced(names)), "a parameter check")[0]
        if unplaced:
            self.close()
            raise RolloutEngineError(f"rollout.engine=vllm: vLLM's {type(model).__name__} has no place for "
                                     f"{unplaced[0]} ({len(unplaced)} such parameters): every weight sync would drop "
                                     "them and the engine sample without them; use rollout.engine=hf")
        self._synced_version = self._model_version()
        self._temperature = 1.0  # what the engine's logits are divided by (_scale_logits)
        self.asleep = False
        self.probe = None
        self.syncs = 0
        self.last_probe_error = None

    # ---------------------------------------------------------------- weights

    def _model_version(self):
        """A number that changes whenever any parameter of the training model is modified in place."""
        return sum(p._version for p in self.model.parameters())

    def _weights(self):
        """``[(name, tensor)]`` of the training model in the engine's dtype (``engine_weights``: tied weights once,
        LoRA adapters folded in)."""
        return [(name, t.to("cpu", self.dtype).contiguous()) for name, t in engine_weights(self.model)]

    def sync_weights(self, force=False):
        """Push the training model's weights into the engine when they changed since the last push (or
        ``force``), waking it first from sleep (weights, the push, then the KV cache; after a sleep the push is
        forced: level 2 discarded the weights), drop the prefix cache (its KV came from the old weights), and
        check the fingerprint. Raises ``RolloutEngineError`` when the engine is dead, read other bytes, or
        disagrees on the probe. Returns whether it pushed."""
        if self.asleep:
            self._call(lambda: self.llm.wake_up(tags=WAKE_WEIGHTS), "a wake-up (weights)")
            self.push_weights(force=True)
            self._call(lambda: self.llm.wake_up(tags=WAKE_KV_CACHE), "a wake-up (KV cache)")
            self.asleep = False
        elif not self.push_weights(force):
            return False
        self._call(self.llm.reset_prefix_cache, "a prefix-cache reset")
        if self.probe is not None:
            self.check_fingerprint()
        return True

    def push_weights(self, force=False):
        """Write the training model's weights (when changed since the last push, or ``force``) to this rank's
        shared file and load them into the engine's worker; raises ``RolloutEngineError`` unless the worker read
        exactly the bytes written (float64 sums). Returns whether it pushed."""
        version = self._model_version()
        if not force and version == self._synced_version:
            return False
        weights = self._weights()
        size = sum(t.numel() * t.element_size() for _, t in weights)
        path = str(self._dir / f"weights_rank{self.rank}.bin")
        if self._shm is None or self._shm.numel() != size:
            self._shm = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        meta, offset, expected = [], 0, 0.0
        for name, t in weights:
            n = t.numel() * t.element_size()
            self._shm[offset:offset + n].copy_(t.view(-1).view(torch.uint8))
            meta.append((name, t.dtype, tuple(t.shape), offset))
            expected += float(t.double().sum())
            offset += n
        got = self._call(lambda: self.llm.collective_rpc(_worker_load(path, size, meta)), "a weight sync")
        if not all(math.isclose(g, expected, rel_tol=1e-9, abs_tol=1e-6) for g in got):
            raise RolloutEngineError(f"weight sync: the engine read weights summing to {got}, the trainer wrote "
                                     f"{expected}; stopping rather than sampling from other weights")
        self._synced_version = version
        self.syncs += 1
        return True

    def _scale_logits(self):
        """Divide the engine's logits by ``rollout.temperature`` when that changed since the last call."""
        temperature = self.config.temperature
        if temperature == self._temperature:
            return
        found = self._call(lambda: self.llm.collective_rpc(_worker_set_temperature(temperature)), "a temperature set")
        if not all(found):
            raise RolloutEngineError("rollout.temperature: the vLLM engine's model has no LogitsProcessor to apply "
                                     f"temperature {temperature} to; its log-probs would not be the trainer's")
        self._temperature = temperature

    @torch.no_grad()
    def trainer_logprobs(self, ids):
        """The training model's log-probs ``[len(ids) - 1]`` of ``ids[1:]`` at ``rollout.temperature``."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        finally:
            self.model.train(was_training)
        logprobs = torch.log_softmax(logits / self.config.temperature, -1)  # [len(ids) - 1, V]
        return logprobs.gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()

    def engine_logprobs(self, ids):
        """The engine's log-probs ``[len(ids) - 1]`` of ``ids[1:]`` (prompt log-probs, at ``rollout.temperature``)."""
        self._scale_logits()
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self._call(lambda: self.llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False),
                         "a probe")[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])

    def check_fingerprint(self):
        """Compare the engine's probe log-probs with the trainer's; raise when they differ past the dtype's
        tolerance (``PROBE_ATOL``). Returns the max abs difference."""
        err = float((self.engine_logprobs(self.probe) - self.trainer_logprobs(self.probe)).abs().max())
        self.last_probe_error = err
        if not err <= PROBE_ATOL[self.dtype]:
            raise RolloutEngineError(f"weight sync: the engine's log-probs of the probe sequence differ from the "
                                     f"trainer's by up to {err:.3g} (tolerance {PROBE_ATOL[self.dtype]} for "
                                     f"{self.dtype}); the engine does not hold the trained weights")
        return err

    # ---------------------------------------------------------------- sampling

    def _call(self, fn, what):
        try:
            return fn()
        except RolloutEngineError:
            raise
        except Exception as exc:
            dead = type(exc).__name__ == "EngineDeadError" or "dead" in str(exc).lower()
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            if dead:
                raise RolloutEngineError(f"the vLLM engine process died during {what} ({reason}); the run stops "
                                         "(was it killed, or out of memory?)") from None
            raise RolloutEngineError(f"the vLLM engine failed during {what} ({type(exc).__name__}: {reason})") \
                from None

    def rollout(self, examples, make_env, group_size=None, greedy=None):
        """``HFRolloutEngine.rollout`` after ``prepare`` (weights in and checked), whose outcome every rank shares
        (a failure on one rank raises on all); then, in sleep mode, the engine sleeps until the next call."""
        error, prompts = None, None
        with dist.signals_deferred():  # a Ctrl-C raises (the trainer's step abort) once every rank has shared
            try:
                prompts = self._prompt_ids(examples)
                self.prepare(examples, prompts)
            except RolloutEngineError as exc:
                error = str(exc)
            except Exception as exc:  # e.g. /dev/shm full, out of memory while gathering: shared with every rank
                error = f"weight sync failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            failed = [(r, e) for r, e in enumerate(dist.gather_errors(error)) if e is not None]
        if failed:  # on every rank alike: none goes on to a collective the others never reach
            r, message = failed[0]
            raise RolloutEngineError(f"rank {r}'s vLLM engine: {message}" if dist.is_distributed() else message)
        episodes = self._episodes(examples, prompts, make_env, group_size, greedy)
        if self.sleep:
            self._call(lambda: self.llm.sleep(level=SLEEP_LEVEL), "sleep")
            self.asleep = True
        return episodes

    def prepare(self, examples, prompts):
        """Refuse a prompt that leaves no position for a response (its episodes would end as "length" with no token
        sampled); ``sync_weights``; on the first call also pick the probe (the first prompt, cut) and check the
        engine's starting weights against it. ``prompts``: ``_prompt_ids(examples)``."""
        longest = max(map(len, prompts.values()), default=0)
        if longest >= self.max_len:
            raise RolloutEngineError(f"a prompt of {longest} tokens does not fit the engine's {self.max_len} positions "
                                     f"(rollout.vllm_max_model_len={self.config.vllm_max_model_len}, at most the "
                                     "model's max_position_embeddings): no room for a response; raise it, or shorten "
                                     "the prompts")
        self.sync_weights()
        if self.probe is None and examples:
            self.probe = list(prompts[examples[0].id])[:PROBE_TOKENS]
            self.check_fingerprint()

    def _generate_turn(self, contexts, greedy, budgets):
        """One assistant turn for every context (token ids), at most ``budgets[i]`` tokens for context i (within
        the engine's max_model_len), one request each, in one ``generate`` call. Returns per row (tokens,
        behaviour logps, ended on the end-of-turn token)."""
        cfg = self.config
        self._scale_logits()  # the temperature is in the logits: vLLM samples at 1 (or greedy)
        seeds = torch.randint(0, 2 ** 31 - 1, (len(contexts),), generator=self.generator).tolist()
        params = [self._SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0 if greedy else cfg.top_p,
                                       max_tokens=b, logprobs=0, ignore_eos=True, stop_token_ids=[self.eos], seed=s,
                                       detokenize=False) for s, b in zip(seeds, budgets)]
        prompts = [{"prompt_token_ids": list(c)} for c in contexts]
        outs = self._call(lambda: self.llm.generate(prompts, params, use_tqdm=False), "a rollout turn")
        tokens, logps, ended = [], [], []
        for out in outs:
            c = out.outputs[0]
            toks = list(c.token_ids)
            tokens.append(toks)
            logps.append([float(d[t].logprob) for d, t in zip(c.logprobs, toks)])
            ended.append(bool(toks) and toks[-1] == self.eos)
        return tokens, logps, ended

    def close(self):
        """Shut the engine's processes down and delete its files (the engine is unusable afterwards)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # already dead: nothing left to shut down
                pass
        self._shm = None
        shutil.rmtree(self._dir, ignore_errors=True)
