"""Whole-step model: one PACT training step on a GPU, rollouts + scoring + update, per rollout engine.
Every figure is a PREDICTION (no GPU has run this project); the GPU suite's measured times would calibrate it.

    python bench/step_model.py                                       # the table
    python bench/step_model.py --json bench/results/step_model.json  # also the rows as JSON
    python bench/step_model.py --turns 8 --groups 16                 # another workload (defaults: W-group)
    python bench/step_model.py --score-pass on                       # the old-log-prob pass for every engine

Workload (``Workload``; defaults SPEC section 6's W-group: a Qwen3-1.7B-shaped model, 28 layers, H=2048,
16 / 8 heads of 128, MLP 6144, V=151,936, untied lm_head as bench/bench_group.py builds it; one group of G=8
rollouts, prompt P=4096, trace T=2048, prompt-only header U=16, trace as assistant turns E=2048). SPEC fixes
the response length R=1024 but not its turns: the defaults split it into ``turns``=4 assistant turns of
``model_tokens``=208 sampled tokens, each but the last followed by ``tool_tokens``=64 tokens of tool response,
R = turns * model_tokens + (turns - 1) * tool_tokens. Episodes run in lockstep (all turns of all G episodes
end together) and ``groups`` groups (prompts per step) share the rollout batch.

Every kernel is priced by the roofline's time model (bench/roofline.py: ``launch_terms`` at its ``DEVICES``
and efficiency ``CLASSES``): device time = max(compute, memory, issue). The host side is simulated as one
CUDA stream (``stream_time``): each launch costs the host ``CLASSES.launch_s``; a kernel starts when it is
launched and the GPU is free; a synchronisation makes the host wait for the GPU. So a stretch of small
kernels is launch bound (host time) and a stretch of large ones is GPU bound, each where it belongs. One
departure from the roofline (``op_terms``): a skinny GEMM, fewer output rows or columns than the roofline's
128-row tile (every decode step's), is not priced by waves of 128 x 256 tiles, which would leave it at ~1% of
the peak; its compute term is its FLOPs at the GEMM class's fraction of the peak, so its bytes bound it.

Rollouts, HF engine (``pact_fast.rollout.HFRolloutEngine._generate_turn``; the trainer calls it with the fp32
model and no autocast, so its GEMMs run on the fp32 CUDA cores, ``CONSTANTS.fp32_peak_flops``, and weights are
4 bytes): per turn k the whole conversation, context c_k = P + U + k (model_tokens + tool_tokens), is
prefilled again (no prefix cache across turns: a fresh KV cache per turn), its lm_head computing the last
position's logits only (``logits_to_keep=1``); then model_tokens - 1 decode forwards over the G * groups live rows, the
j-th with c_k + j - 1 cached tokens. What one forward launches is counted, not assumed: the real model class
(transformers' Qwen3, ``pact_fast.models.random_qwen3``, at the workload's full size) runs on the meta device
under a dispatch counter (``KernelCounter``): every kernel-launching aten op with the bytes of its tensors,
cuBLAS GEMMs with their (m, n, k), SDPA as one attention kernel (``AttentionAsOneKernel``), host
synchronisations (the padding-mask check's ``.item()``). Decode forwards are counted at the first and last
step of a turn; every op's FLOPs and bytes are affine in the cached length, so the steps between are
interpolated exactly. Around each decode forward the engine itself: its sampling on the device
(``pact_fast.rollout._sample`` counted the same way over [rows, V] fp32 logits), the sampled ids and their
log-probs copied to the host (a synchronisation, ``CONSTANTS.pcie_bandwidth``), the attention mask grown by a
``torch.cat``, the positions incremented.

Rollouts, vLLM engine (``pact_fast.rollout_vllm``, bf16): one ``generate`` per turn; prefix caching, so turn
0 prefills the G * groups prompts (no sharing between requests of one batch is assumed) and turn k > 0 only
the tool response and the last sampled token (tool_tokens + 1 per episode; up to one 16-token block more is
recomputed in reality); then model_tokens - 1 decode steps. Its kernels are read off vLLM 0.32's Qwen3
(``vllm/model_executor/models/qwen3.py``): per layer ``VLLM_LAYER`` (fused residual-add RMSNorm, merged QKV
GEMM, q/k RMSNorms, rotary, KV-cache write, flash attention, o_proj, fused-add RMSNorm, merged gate_up GEMM,
SiLU-and-mul, down), per forward an embedding, a final norm and the lm_head over one row per request, then
``CONSTANTS.vllm_sampler_kernels`` sampler kernels over [rows, V] fp32. Decode streams its bytes at the
roofline's achieved bandwidth (its memory class, no separate decode class: attention reads every request's
cached K/V once) and runs its GEMMs at the roofline's GEMM class; prefill attention at the roofline's
attention forward class. Two
modes: ``vllm`` with CUDA graphs (``rollout.vllm_enforce_eager=false``: a decode forward is one graph launch),
and ``vllm-eager`` (the project's default ``vllm_enforce_eager=true``: every kernel a launch). Each step adds
``CONSTANTS.vllm_step_host_s`` of scheduler / input / output work on the host, not overlapped, and a
synchronisation for the sampled ids. Each training step also pushes the weights into the engine (fp32 ->
bf16 cast and copy: ``CONSTANTS.weight_sync_bytes_per_param``).

Scoring: the trainer's no-grad pass for the old log-probs (``trainer._old_logps``) runs only when
``update_epochs`` > 1, with a KL reference, or with truncated importance sampling, on by default with vLLM
(``rollout_vllm.is_cap``): so by default the vLLM engine pays it and the HF engine does not (``score_pass``
overrides). One packed forward over the group's token trie (SPEC section 2; L = 24,592 tokens at W-group):
the body's GEMMs, 2 * L * (linear weights) FLOPs in bf16 under autocast at compulsory bytes
(``roofline.gemm_launches``), plus autocast's fp32 -> bf16 copy of each linear weight; tree attention, the
roofline's forward launches (``roofline.attention_launches``) per layer; the other kernels of the HF decoder
layer (norms, RoPE, SiLU, residual adds), counted on the meta device like the rollouts' at fp32 activations
(the fp32 residual stream under autocast; an upper bound for the ops on bf16 projection outputs); the
log-prob head, the roofline's ``linear_logprobs fwd`` at N = 2 G R + E scored rows.

Update: the same forward with gradients, then the backward: per forward GEMM its dX and dW GEMMs (so the
body is 2 + 4 = 6 * L * weights FLOPs in all), each counted elementwise kernel's backward assumed to be two
launches of its forward bytes (the saved input and the incoming gradient read, the input gradient written;
autograd's own graph is not counted), dW cast to fp32 and accumulated into ``.grad``, the tree attention's
forward + backward launches (split dq), the fused PACT head (``train.fused_head``, the default; the roofline's
``fused_pact_head fwd+bwd``) at N rows; then gradient clipping (``CONSTANTS.clip_bytes_per_param``) and
torch's foreach AdamW over fp32 weights (``CONSTANTS.adamw_bytes_per_param``), every parameter. One packed
pass per group (the trie in one micro-batch, as bench_group.py and the roofline's W-group layer run it; the
trainer's default ``micro_batch_tokens``=8192 would split a W-group trie and copy its prompt into each piece,
which this model does not price).

Output rows, per device and engine: ms of rollouts, scoring, update and the step, each part's fraction of the
step, and the sub-terms (prefill, decode, host sampling, launches per decode step, kernels per layer).
Memory the rollouts hold (``rollout_memory_mib``): the KV cache at the end of the last turn, and for the HF engine
the last turn's prefill logits [rows, context, V] fp32. Units: ms; MiB = 2^20 bytes (``roofline.MIB``).
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from common import json_target_error  # noqa: E402
from roofline import CLASSES, DEVICES, MIB, TORCH_FREE, TORCH_SYNCS, Launch, flat_tensors, launch_terms  # noqa: E402
from pact_fast.kernels.tree_attention_launch import GATE_HEAD_DIMS  # noqa: E402

FP32, BF16 = 4, 2
ENGINES = ("hf", "vllm", "vllm-eager")
PARTS = ("rollouts", "scoring", "update")


@dataclass(frozen=True)
class Constants:
    """The whole-step model's own constants (sources in ``SOURCES``); the rest are the roofline's."""

    fp32_peak_flops: float = 67e12  # FP32 (CUDA cores, no tensor cores) peak of H100 / H200 SXM
    pcie_bandwidth: float = 25e9  # device -> host copy of the logits, byte/s
    vllm_step_host_s: float = 0.5e-3  # vLLM scheduler + input preparation + output processing per step
    vllm_sampler_kernels: int = 6  # kernels of vLLM's sampler per step, each over [rows, V] fp32
    weight_sync_bytes_per_param: int = 10  # fp32 read + bf16 write (cast), bf16 read + write (engine copy)
    adamw_bytes_per_param: int = 36  # foreach AdamW, fp32: p, grad, m, v read; p, m, v written; sqrt(v) list
    clip_bytes_per_param: int = 12  # clip_grad_norm_: the norm reads grad; the scale reads and writes it


CONSTANTS = Constants()
DEVICE_MEMORY_GIB = {"H100": 80, "H200": 141}  # HBM capacity, for the rollout-phase fit check only
SOURCES = {
    "fp32_peak_flops": "NVIDIA H100 SXM and H200 SXM datasheets: FP32 67 TFLOP/s. torch's default (float32 matmul "
                       "precision 'highest', allow_tf32 False) keeps fp32 GEMMs off the tensor cores; the "
                       "roofline's GEMM class (fraction of peak, tile waves) and attention fraction are applied "
                       "to this peak too (an assumption)",
    "pcie_bandwidth": "PCIe Gen5 x16 is 64 GB/s per direction (H100 SXM host link); 25 GB/s assumed achieved for "
                      "a small pageable device->host copy (the sampled ids and log-probs)",
    "vllm_step_host_s": "assumption: vLLM's V1 blog (2025-01-24) names scheduling, input preparation and output "
                        "processing as the CPU overhead that matters when a step's GPU time is a few ms; 0.5 ms "
                        "per step, not overlapped with the GPU, is assumed, not measured",
    "vllm_sampler_kernels": "assumption: temperature scaling, log-softmax for the returned log-probs, softmax, "
                            "exponential noise, argmax, gather: 6 kernels over [rows, V] fp32",
    "vllm_layer": "vLLM 0.32.0 vllm/model_executor/models/qwen3.py: Qwen3DecoderLayer.forward and "
                  "Qwen3Attention.forward (RMSNorm with fused residual add, merged qkv_proj, q_norm, k_norm, "
                  "rotary_emb, attn = KV-cache write + flash attention, o_proj, fused-add RMSNorm, merged "
                  "gate_up_proj, SiluAndMul, down_proj): 12 kernels a layer, read from the source",
    "weight_sync_bytes_per_param": "assumption: the trainer's fp32 weights cast to bf16 and copied into the "
                                   "engine's buffers on the same GPU; the fingerprint check is not priced",
    "adamw_bytes_per_param": "torch.optim.AdamW(foreach=True) on fp32 weights: reads param, grad, exp_avg, "
                             "exp_avg_sq (16 B), writes param, exp_avg, exp_avg_sq (12 B), and its sqrt(exp_avg_sq) "
                             "temporary list written and read (8 B); pact_fast/planner.py has the same temporaries",
    "clip_bytes_per_param": "torch.nn.utils.clip_grad_norm_ (foreach): the norm reads every fp32 gradient (4 B), "
                            "the scale reads and writes it (8 B)",
    "device_memory_gib": "NVIDIA H100 SXM datasheet 80 GB, H200 SXM 141 GB (taken as GiB: the check is coarse)",
    "roofline": "kernel pricing, DEVICES, CLASSES (incl. launch_s = 4.5 us per launch) and their SOURCES: "
                "bench/roofline.py",
}


@dataclass(frozen=True)
class Workload:
    """One training step's shape. Model: Qwen3-shaped (``layers``, ``hidden``, heads, ``ffn``, ``vocab``); group:
    P, T, U, E as SPEC section 6; rollouts: ``turns`` assistant turns of ``model_tokens`` each, ``tool_tokens``
    of tool response after each but the last; ``groups`` prompt groups of G episodes per step."""

    layers: int = 28
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 6144
    vocab: int = 151936
    P: int = 4096
    T: int = 2048
    U: int = 16
    E: int = 2048
    G: int = 8
    turns: int = 4
    model_tokens: int = 208
    tool_tokens: int = 64
    groups: int = 1

    def __post_init__(self):
        may_be_zero = ("tool_tokens", "U", "E", "P")  # no tool turns, no trace, no prompt: still a workload
        bad = [f.name for f in fields(self) if not isinstance(getattr(self, f.name), int)
               or getattr(self, f.name) < (0 if f.name in may_be_zero else 1)]
        if bad:  # a 0 head count or width divided by zero deep in the model
            raise ValueError(f"step_model: workload fields must be integers >= 1 ({', '.join(may_be_zero)} >= 0); "
                             f"not {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"step_model: heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.head_dim not in GATE_HEAD_DIMS:  # the attention's issue term is read off their SASS profiles
            raise ValueError(f"step_model: head_dim={self.head_dim} must be one of {GATE_HEAD_DIMS}, the head dims "
                             "the compile gate builds tree attention for (bench/results/roofline_sass.json)")

    @property
    def R(self):
        """Response tokens of one episode: its model tokens and the tool responses between its turns."""
        return self.turns * self.model_tokens + (self.turns - 1) * self.tool_tokens

    @property
    def rollout_rows(self):
        return self.G * self.groups

    def context(self, k):
        """Tokens in turn k's context (k = 0: the prompt-only prompt P + U)."""
        return self.P + self.U + k * (self.model_tokens + self.tool_tokens)

    def linear_shapes(self):
        """[(n, k)] of one decoder layer's linear weights [out, in]: q, k, v, o, gate, up, down."""
        H, q, kv, F = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn
        return [(q, H), (kv, H), (kv, H), (H, q), (F, H), (F, H), (H, F)]

    def linear_params(self):
        """Parameters of every decoder layer's linear weights (the body GEMMs' weights)."""
        return self.layers * sum(n * k for n, k in self.linear_shapes())

    def params(self):
        """Every parameter: body linears, norms (2 H + 2 head_dim a layer, H final), embedding, untied lm_head."""
        norms = self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.linear_params() + norms + 2 * self.vocab * self.hidden

    def group_spec(self):
        """bench_group's workload dict for this group (make_group's P, T, U, E, G, R and vocabulary)."""
        return dict(P=self.P, T=self.T, U=self.U, E=self.E, G=self.G, R=self.R, vocab=self.vocab)


def w_group(**overrides):
    """The W-group workload (SPEC section 6), with fields overridden by name."""
    return replace(Workload(), **overrides)


# ---------------------------------------------------------------------------------------------
# Counting what eager PyTorch launches: a dispatch counter, SDPA as one kernel
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One host call in a CUDA stream: ``launch`` a kernel (a roofline ``Launch``; None for host-only work),
    ``host_s`` seconds of host time to issue it (``CLASSES.launch_s`` for a launch) or to do host work, ``sync``:
    the host first waits for every kernel issued before (``.item()``, a device -> host copy); ``part`` a label."""

    name: str
    launch: Launch = None
    host_s: float = 0.0
    sync: bool = False
    part: str = ""  # what the op belongs to, for the GPU time split (``stream_time``'s "parts")


GEMM_OPS = frozenset("mm addmm bmm baddbmm".split())


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def gemm_op(name, m, n, k, elem_bytes, batch=1, classes=CLASSES):
    """Op of one cuBLAS GEMM [m, k] x [k, n] (``batch`` of them): 2 b m n k FLOPs, every operand and the output
    once (compulsory bytes, as ``roofline.gemm_launches``), priced as a GEMM with a [b m, n] output."""
    flops = 2 * batch * m * n * k
    nbytes = batch * (m * k + k * n + m * n) * elem_bytes
    return Op(name, Launch(name, flops, nbytes, "gemm", gemm=(batch * m, n, k)), classes.launch_s)


def torch_op(name, nbytes, classes=CLASSES):
    """Op of one memory-bound kernel moving ``nbytes``."""
    return Op(name, Launch(name, 0, int(nbytes), "torch"), classes.launch_s)


def attention_pairs(q_len, kv_len, causal):
    """Visible (query, key) pairs of one head: dense q_len * kv_len, or with torch's ``is_causal`` (top-left
    aligned, query i sees keys 0..i) sum_i min(i + 1, kv_len)."""
    if not causal:
        return q_len * kv_len
    full = max(0, q_len - kv_len)  # queries past the last key see every key
    tri = min(q_len, kv_len)
    return tri * (tri + 1) // 2 + full * kv_len


class KernelCounter(TorchDispatchMode):
    """Records, as a list of ``Op`` (``ops``), what a stretch of eager PyTorch launches on a GPU: every aten op
    that is not a view or an allocation (``roofline.TORCH_FREE``) is one kernel, a GEMM (aten mm / addmm /
    bmm / baddbmm) priced by its shape (``gemm_op``, at the element size of its operands), any other kernel at
    the bytes of its tensors (read and written once); host synchronisations (``roofline.TORCH_SYNCS``:
    ``.item()``, ``nonzero``...) set ``sync``. Ops decomposed by PyTorch (CompositeImplicitAutograd) are counted
    as what they decompose into. On the meta device an ``.item()`` has no value: it answers ``meta_scalar``
    (True for a bool tensor), the answer an all-ones attention mask gives to transformers' padding check."""

    def __init__(self, classes=CLASSES, meta_scalar=1):
        super().__init__()
        self.ops, self.classes, self.meta_scalar = [], classes, meta_scalar

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._opname
        if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if packet == "_local_scalar_dense" and args[0].is_meta:
            self.ops.append(Op(str(func), sync=True))
            return bool(self.meta_scalar) if args[0].dtype == torch.bool else self.meta_scalar
        out = func(*args, **kwargs)
        if packet in GEMM_OPS:
            a, b = (args[0], args[1]) if packet in ("mm", "bmm") else (args[1], args[2])
            *batch, m, k = a.shape
            self.ops.append(gemm_op(str(func), m, b.shape[-1], k, a.element_size(),
                                    batch=batch[0] if batch else 1, classes=self.classes))
        elif packet in TORCH_FREE:
            pass
        elif packet == "embedding":  # reads the looked-up rows only, not the whole table
            self.ops.append(torch_op(str(func), 2 * _nbytes([out]) + _nbytes([args[1]]), self.classes))
        else:
            nbytes = _nbytes(flat_tensors(list(args) + list(kwargs.values())) + flat_tensors(out))
            op = torch_op(str(func), nbytes, self.classes)
            self.ops.append(replace(op, sync=packet in TORCH_SYNCS))
        return out


class AttentionAsOneKernel(TorchFunctionMode):
    """Under a ``KernelCounter``: ``F.scaled_dot_product_attention`` is recorded as one fused attention kernel
    (flash / memory-efficient on a GPU) instead of whatever the meta or CPU backend decomposes it into, and not
    run (its output is an empty tensor of the right shape). FLOPs 4 * B * Hq * D * pairs (``attention_pairs``;
    an explicit mask: every pair, as the kernel computes them), bytes q, k, v and the mask read, the output
    written, priced at the attention forward class."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "scaled_dot_product_attention":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        B, Hq, Lq, D = q.shape
        Lk = k.shape[-2]
        pairs = attention_pairs(Lq, Lk, causal and mask is None)
        nbytes = _nbytes([q, k, v]) + q.numel() * v.element_size() + (_nbytes([mask]) if mask is not None else 0)
        self.counter.ops.append(Op("sdpa", Launch("sdpa", 4 * B * Hq * D * pairs, nbytes, "attention_fwd"),
                                   self.counter.classes.launch_s))
        return q.new_empty((B, Hq, Lq, v.shape[-1]))


@lru_cache(maxsize=8)
def meta_model(shape, layers):
    """transformers' Qwen3 causal LM (``pact_fast.models.random_qwen3``, sdpa attention, untied lm_head, fp32)
    of ``shape`` (a Workload's model fields) and ``layers`` on the meta device: shapes, no memory, no compute."""
    from pact_fast.models import random_qwen3

    w = Workload(**dict(shape))
    with torch.device("meta"):
        model = random_qwen3(w.vocab, hidden_size=w.hidden, intermediate_size=w.ffn, num_layers=layers,
                             num_heads=w.heads, num_kv_heads=w.kv_heads, head_dim=w.head_dim,
                             max_positions=1 << 20, seed=0, dtype=torch.float32, tie_word_embeddings=False)
    return model.eval()


MODEL_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")


def count_forward(w, rows, q_len, past=0, base_only=False, layers=None, classes=CLASSES):
    """[Op] of one eager forward of the workload's model (``layers`` decoder layers, default all) on ``rows``
    sequences of ``q_len`` new tokens after ``past`` cached ones, as ``HFRolloutEngine._generate_turn`` calls
    it (attention mask of ones, positions, ``use_cache``; the causal LM with the last position's logits), or
    ``base_only``: the decoder body without cache or mask (the trainer's packed forward runs the body and its
    own head). Counted on the meta device (``KernelCounter``, ``AttentionAsOneKernel``)."""
    from pact_fast.rollout import _cache_argument, _last_logits_only

    layers = w.layers if layers is None else layers
    model = meta_model(tuple((f, getattr(w, f)) for f in MODEL_FIELDS), layers)
    meta = dict(device="meta")
    ids = torch.zeros(rows, q_len, dtype=torch.long, **meta)
    positions = (past + torch.arange(q_len, **meta))[None].expand(rows, -1)
    counter = KernelCounter(classes)
    with torch.no_grad():
        if base_only:
            with AttentionAsOneKernel(counter), counter:
                model.model(input_ids=ids, position_ids=positions, use_cache=False)
            return counter.ops
        cache_arg, cache = _cache_argument(model), {}
        if past:
            with AttentionAsOneKernel(KernelCounter(classes)), KernelCounter(classes):
                out = model(input_ids=torch.zeros(rows, past, dtype=torch.long, **meta),
                            attention_mask=torch.ones(rows, past, dtype=torch.long, **meta),
                            position_ids=torch.arange(past, **meta)[None].expand(rows, -1), use_cache=True)
            cache = {cache_arg: out[cache_arg]}
        mask = torch.ones(rows, past + q_len, dtype=torch.long, **meta)
        with AttentionAsOneKernel(counter), counter:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache,
                  **_last_logits_only(model))
    return counter.ops


def kernels_per_layer(w, rows, q_len, past=0, base_only=False):
    """(kernels one decoder layer launches, kernels outside the layers) of one counted forward: the difference
    between the forward with 2 layers and with 1, and the rest."""
    one, two = (count_forward(w, rows, q_len, past, base_only, layers=n) for n in (1, 2))
    per_layer = sum(o.launch is not None for o in two) - sum(o.launch is not None for o in one)
    return per_layer, sum(o.launch is not None for o in one) - per_layer


# ---------------------------------------------------------------------------------------------
# Pricing: device seconds per op, and the single-stream host / GPU simulation
# ---------------------------------------------------------------------------------------------

def fp32_device(device):
    """The roofline Device with the fp32 (CUDA-core) peak in place of the bf16 tensor-core peak, and classes
    whose attention rates scale the same way: how the fp32 HF rollout model's GEMMs and attention are priced."""
    dev = DEVICES[device] if isinstance(device, str) else device
    scale = CONSTANTS.fp32_peak_flops / dev.peak_flops
    return (replace(dev, peak_flops=CONSTANTS.fp32_peak_flops),
            replace(CLASSES, attention_fwd_flops=CLASSES.attention_fwd_flops * scale,
                    attention_bwd_flops=CLASSES.attention_bwd_flops * scale))


def op_terms(op, device, classes=CLASSES):
    """(compute, max(memory, issue)) seconds of one op's kernel by ``roofline.launch_terms``; (0, 0) without one.
    A skinny GEMM (fewer output rows or columns than ``CLASSES.gemm_tile``'s rows: a decode step's) is not priced
    by the roofline's waves of 128 x 256 tiles, which would leave it ~1% of the peak: cuBLAS picks small-tile or
    GEMV kernels for such shapes; its compute term is FLOPs at ``gemm_fraction`` of the peak, no waves (memory
    then bounds it, as for every decode GEMM here)."""
    if op.launch is None:
        return 0.0, 0.0
    t = launch_terms(op.launch, device, classes)
    compute = t["compute"]
    if op.launch.kind == "gemm" and min(op.launch.gemm[:2]) < classes.gemm_tile[0]:
        dev = DEVICES[device] if isinstance(device, str) else device
        compute = op.launch.flops / (dev.peak_flops * classes.gemm_fraction)
    return compute, max(t["memory"], t["issue"])


def device_seconds(op, device, classes=CLASSES):
    """GPU seconds of one op's kernel: the max of its ``op_terms`` (0 without a kernel)."""
    return max(op_terms(op, device, classes))


def stream_time(ops, device, classes=CLASSES, gpu_seconds=None):
    """{total, gpu, host, launches, syncs, parts} (seconds, counts; parts: GPU seconds per ``Op.part``) of ``ops``
    issued in order on one CUDA stream.

    host clock h, GPU clock g, both 0 at the start; per op: a ``sync`` first sets h = max(h, g); then h +=
    host_s; a kernel of device time t (``device_seconds``, or ``gpu_seconds[i]``) runs from max(g, h): g =
    max(g, h) + t. total = max(h, g): host bound when launches outlast kernels, GPU bound otherwise."""
    h = g = busy = host = 0.0
    parts = {}
    for i, op in enumerate(ops):
        if op.sync:
            h = max(h, g)
        h += op.host_s
        host += op.host_s
        if op.launch is not None:
            t = gpu_seconds[i] if gpu_seconds is not None else device_seconds(op, device, classes)
            g = max(g, h) + t
            busy += t
            parts[op.part] = parts.get(op.part, 0.0) + t
    return {"total": max(h, g), "gpu": busy, "host": host, "launches": sum(o.launch is not None for o in ops),
            "syncs": sum(o.sync for o in ops), "parts": parts}


def interpolated_times(ops_a, ops_b, fractions, device, classes=CLASSES):
    """[stream_time] of forwards between two counted ones (the same ops, FLOPs and bytes affine in the cached
    length: decode steps): op i's compute and memory seconds at fraction f are (1 - f) a + f b of their values
    in ``ops_a`` and ``ops_b``, its device time their max. Raises if the two op lists differ in kind."""
    if [(o.name, o.sync, o.launch is None) for o in ops_a] != [(o.name, o.sync, o.launch is None) for o in ops_b]:
        raise ValueError("step_model: the decode forwards at two cache lengths launch different kernels")

    pa, pb = [op_terms(o, device, classes) for o in ops_a], [op_terms(o, device, classes) for o in ops_b]
    out = []
    for f in fractions:
        secs = [max((1 - f) * a[0] + f * b[0], (1 - f) * a[1] + f * b[1]) for a, b in zip(pa, pb)]
        out.append(stream_time(ops_a, device, classes, gpu_seconds=secs))
    return out


def _sum(times):
    """The sum of ``stream_time`` dicts (their parts added by name)."""
    out = {k: sum(t[k] for t in times) for k in ("total", "gpu", "host", "launches", "syncs")}
    out["parts"] = {}
    for t in times:
        for name, v in t["parts"].items():
            out["parts"][name] = out["parts"].get(name, 0.0) + v
    return out


def _repeat(t, n):
    return _sum([t] * n)


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------

def hf_sample_ops(w):
    """[Op] of ``pact_fast.rollout._sample`` on the device over [rows, V] fp32 logits (temperature 1, top-p 1;
    counted on the meta device), then the sampled ids and log-probs to the host (a synchronisation)."""
    from pact_fast.rollout import _sample

    B = w.rollout_rows
    counter = KernelCounter(CLASSES)
    with torch.no_grad(), counter:
        _sample(torch.zeros(B, w.vocab, device="meta"), 1.0, 1.0, False, None)
    return counter.ops + [Op("tokens, logp .cpu()", host_s=B * (8 + 4) / CONSTANTS.pcie_bandwidth, sync=True)]


def hf_advance_ops(w, context):
    """[Op] the HF engine issues between a sampled token and the next decode forward at ``context`` tokens in the
    attention mask: the mask grown by one column (``torch.cat``, int64) and the positions incremented."""
    B = w.rollout_rows
    return [torch_op("torch.cat(attention_mask)", B * (2 * context + 1) * 8), torch_op("next_pos + 1", 2 * B * 8)]


def hf_prefill_ops(w, context):
    """[Op] of one turn's start in the HF engine: ids and mask to the device, positions (cumsum, subtract,
    clamp), the prefill forward of ``context`` tokens per row, the last position's logits only (counted)."""
    B = w.rollout_rows
    setup = [torch_op("ids to device", B * context * 8), torch_op("mask to device", B * context * 8)] + \
        [torch_op(f"position_ids {k}", 2 * B * context * 8) for k in ("cumsum", "sub", "clamp_min")]
    return setup + count_forward(w, B, context)


def rollout_memory_mib(w, engine):
    """{kv_cache, prefill_logits, peak} MiB at the last turn: K and V of every layer for rows x (last context +
    model_tokens) tokens (fp32 for HF, bf16 for vLLM); HF's prefill logits rows x V fp32 (the last position's:
    ``logits_to_keep=1``; 0 for vLLM, whose [rows, V] logits live in its own KV budget); the peak adds the
    trainer's fp32 weights and AdamW state, 12 bytes a parameter (pact_fast/planner.py's rollout phase), and for
    vLLM its own bf16 weights, 2 bytes a parameter."""
    hf = engine == "hf"
    tokens = w.rollout_rows * (w.context(w.turns - 1) + w.model_tokens)
    kv = tokens * w.layers * 2 * w.kv_heads * w.head_dim * (FP32 if hf else BF16)
    logits = w.rollout_rows * w.vocab * FP32 if hf else 0
    resident = (12 + (0 if hf else 2)) * w.params()
    return {"kv_cache": kv / MIB, "prefill_logits": logits / MIB, "peak": (kv + logits + resident) / MIB}


def hf_rollout(w, device):
    """Seconds of the HF engine's rollouts on ``device`` (``stream_time`` dicts): per turn the prefill, the
    decode steps (the engine's work between tokens, the forward, the sampling) and the first token's
    sampling; ``sampling_s``: the GPU seconds of the sampling kernels over the rollouts."""
    dev, classes = fp32_device(device)
    B, m = w.rollout_rows, w.model_tokens
    sample = hf_sample_ops(w)
    prefill, decode = [], []
    per_step = None
    for k in range(w.turns):
        c = w.context(k)
        prefill.append(stream_time(hf_prefill_ops(w, c) + sample, dev, classes))
        if m < 2:
            continue
        first, last = c + 1, c + m - 1  # mask width of the first and last decode forward
        ops_a = hf_advance_ops(w, first - 1) + count_forward(w, B, 1, past=first - 1) + sample
        ops_b = hf_advance_ops(w, last - 1) + count_forward(w, B, 1, past=last - 1) + sample
        steps = interpolated_times(ops_a, ops_b, [j / max(1, m - 2) for j in range(m - 1)], dev, classes)
        decode.append(_sum(steps))
        per_step = per_step or ops_a
    return {"prefill": _sum(prefill), "decode": _sum(decode) if decode else _sum([]),
            "sampling_s": w.turns * m * stream_time(sample, dev, classes)["gpu"],
            "decode_launches_per_step": sum(o.launch is not None for o in per_step) if per_step else 0}


VLLM_LAYER = ("rms_norm (fused add)", "qkv_proj", "q_norm", "k_norm", "rotary", "kv-cache write", "attention",
              "o_proj", "rms_norm (fused add)", "gate_up_proj", "silu_and_mul", "down_proj")


def vllm_forward_ops(w, requests, classes=CLASSES):
    """[Op] of one vLLM forward (bf16) over ``requests`` [(new tokens, cached tokens before)], the kernels of
    ``VLLM_LAYER`` per layer, then the final norm, the lm_head over one row per request and the sampler."""
    H, F, D = w.hidden, w.ffn, w.head_dim
    q, kv = w.heads * D, w.kv_heads * D
    n = sum(new for new, _ in requests)
    pairs = sum(new * before + new * (new + 1) // 2 for new, before in requests)
    kv_read = sum(new + before for new, before in requests) * 2 * kv * BF16
    layer = [torch_op("rms_norm (fused add)", 4 * n * H * BF16 + H * BF16, classes),
             gemm_op("qkv_proj", n, q + 2 * kv, H, BF16, classes=classes),
             torch_op("q_norm", 2 * n * q * BF16, classes), torch_op("k_norm", 2 * n * kv * BF16, classes),
             torch_op("rotary", 2 * n * (q + kv) * BF16, classes),
             torch_op("kv-cache write", 2 * 2 * n * kv * BF16, classes),
             Op("attention", Launch("attention", 4 * w.heads * D * pairs, 2 * n * q * BF16 + kv_read,
                                    "attention_fwd"), classes.launch_s),
             gemm_op("o_proj", n, H, q, BF16, classes=classes),
             torch_op("rms_norm (fused add)", 4 * n * H * BF16 + H * BF16, classes),
             gemm_op("gate_up_proj", n, 2 * F, H, BF16, classes=classes),
             torch_op("silu_and_mul", 3 * n * F * BF16, classes),
             gemm_op("down_proj", n, H, F, BF16, classes=classes)]
    rows = len(requests)
    head = [torch_op("embedding", 2 * n * H * BF16, classes), torch_op("final norm", 3 * n * H * BF16, classes),
            gemm_op("lm_head", rows, w.vocab, H, BF16, classes=classes)]
    sampler = [torch_op("sampler", 2 * rows * w.vocab * FP32, classes) for _ in range(CONSTANTS.vllm_sampler_kernels)]
    return head[:1] + layer * w.layers + head[1:] + sampler


def vllm_step_ops(w, requests, graphs, classes=CLASSES):
    """[Op] of one vLLM engine step: host scheduling, the forward (with ``graphs``: the model's kernels replayed
    from one CUDA graph, one launch of host time; else each kernel launched), the sampled ids back (a sync)."""
    ops = vllm_forward_ops(w, requests, classes)
    if graphs:
        body = len(ops) - CONSTANTS.vllm_sampler_kernels
        ops = [replace(o, host_s=classes.launch_s if i == 0 else 0.0) for i, o in enumerate(ops[:body])] + ops[body:]
    return [Op("vllm scheduler (host)", host_s=CONSTANTS.vllm_step_host_s)] + ops + \
        [Op("sampled ids to host", host_s=len(requests) * 16 / CONSTANTS.pcie_bandwidth, sync=True)]


def vllm_rollout(w, device, graphs):
    """Seconds of the vLLM engine's rollouts: per turn one prefill step of the new tokens (prefix cache:
    turn 0 the whole prompt, later turns the tool response and the last sampled token) and model_tokens - 1
    decode steps (CUDA graphs only for decode, ``graphs``), plus the per-step weight push into the engine."""
    B, m = w.rollout_rows, w.model_tokens
    prefill, decode = [], []
    for k in range(w.turns):
        c = w.context(k)
        new = c if k == 0 else w.tool_tokens + 1
        prefill.append(stream_time(vllm_step_ops(w, [(new, c - new)] * B, graphs=False), device))
        if m >= 2:
            first, last = (vllm_step_ops(w, [(1, c + j - 1)] * B, graphs) for j in (1, m - 1))
            decode.append(_sum(interpolated_times(first, last, [j / max(1, m - 2) for j in range(m - 1)], device)))
    nbytes = CONSTANTS.weight_sync_bytes_per_param * w.params()
    sync = stream_time([torch_op("weight push", nbytes)], device)
    launches = sum(o.launch is not None and o.host_s > 0 for o in vllm_step_ops(w, [(1, w.context(0))] * B, graphs))
    sampler = vllm_forward_ops(w, [(1, w.context(0))] * B)[-CONSTANTS.vllm_sampler_kernels:]
    return {"prefill": _sum(prefill), "decode": _sum(decode) if decode else _sum([]), "weight_sync": sync,
            "decode_launches_per_step": launches,
            "sampling_s": w.turns * m * stream_time(sampler, device)["gpu"]}


# ---------------------------------------------------------------------------------------------
# Scoring and update: the packed pass over the group's token trie
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def trie_layout(group_spec):
    """subtree_end [1, L] int32 of one group's packed token trie (bench_group.make_group + pack_tree)."""
    from bench_group import make_group

    from pact_fast.packing import pack_tree

    seqs, _ = make_group(dict(group_spec))
    return pack_tree(seqs).subtree_end[None].to(torch.int32)


def scored_rows(w):
    """Log-prob rows of one group: every response token in both contexts and the trace: 2 G R + E."""
    return 2 * w.G * w.R + w.E


def _issue_table():
    import sass

    return sass.issue_table(compile_here=False)


def body_ops(w, L, backward, table):
    """[Op] of the packed pass's body over L tokens (bf16 autocast): per layer the counted HF ops with SDPA
    replaced by the roofline's tree-attention launches and GEMMs priced in bf16 (plus autocast's weight casts);
    with ``backward`` each GEMM's dX and dW, two launches per counted elementwise kernel, dW to fp32 ``.grad``."""
    layout = trie_layout(tuple(sorted(w.group_spec().items())))
    if layout.shape[1] != L:
        raise ValueError(f"step_model: trie of {layout.shape[1]} tokens, expected {L}")
    passes = ("fwd", "bwd") if backward else ("fwd",)
    attention = [Op(x.kernel, x, CLASSES.launch_s) for x in
                 roofline.attention_launches(table, layout, w.heads, w.kv_heads, w.head_dim, passes=passes)]
    attention = [replace(a, part="tree attention") for a in attention]
    counted = count_forward(w, 1, L, base_only=True)
    per_layer, _ = kernels_per_layer(w, 1, 8, base_only=True)
    weights = set(w.linear_shapes())
    ops, gemms, elementwise = [], [], []
    for op in counted:
        if op.launch is not None and op.launch.kind == "gemm" and op.launch.gemm[1:] in weights:
            m, n, k = op.launch.gemm
            gemms.append((m, n, k))
            ops.append(replace(torch_op("autocast weight cast", n * k * (FP32 + BF16)), part="weight casts"))
            ops.append(replace(gemm_op("gemm (bf16)", m, n, k, BF16), part="body GEMMs"))
        elif op.launch is not None and op.launch.kind == "attention_fwd":
            ops.extend(a for a in attention if a.launch.kind == "attention_fwd" or not backward)
        else:
            ops.append(replace(op, part="elementwise"))
            elementwise += [ops[-1]] if op.launch is not None else []
    if backward:
        for m, n, k in reversed(gemms):
            ops += [replace(gemm_op("gemm dX (bf16)", m, k, n, BF16), part="body GEMMs"),
                    replace(gemm_op("gemm dW (bf16)", n, k, m, BF16), part="body GEMMs"),
                    replace(torch_op("dW to fp32 .grad", n * k * (BF16 + FP32)), part="weight casts")]
        ops += [o for o in elementwise for _ in range(2)]
        ops += [a for a in attention if a.launch.kind != "attention_fwd"] * w.layers
    return ops, per_layer


def head_ops(w, backward, table):
    """[Op] of the log-prob head at N = ``scored_rows`` (H, V of the workload): the roofline's launches of
    ``linear_logprobs fwd`` (scoring) or ``fused_pact_head fwd+bwd`` (update), its host syncs at the end."""
    shape = {"N": scored_rows(w), "V": w.vocab, "H": w.hidden}
    if backward:
        _, launches, _, _, _, syncs = roofline.FAMILIES["head"](table, shape, dict(want_entropy=False), None)
    else:
        _, launches, _, _, _, syncs = roofline.FAMILIES["logprob"](table, shape, dict(passes=("fwd",)), None)
    return [Op(x.kernel, x, CLASSES.launch_s, part="log-prob head") for x in launches] + \
        [Op("head sync", sync=True)] * syncs


def packed_pass(w, device, backward, table=None):
    """Seconds (``stream_time``) of one step's packed passes (one per group): body + head, with ``backward``
    also the backward, gradient clipping and AdamW over every parameter."""
    table = table if table is not None else _issue_table()
    L = int(trie_layout(tuple(sorted(w.group_spec().items()))).shape[1])
    body, per_layer = body_ops(w, L, backward, table)
    one = stream_time(body + head_ops(w, backward, table), device)
    out = _repeat(one, w.groups)
    if backward:
        P = w.params()
        opt = stream_time([replace(torch_op("clip_grad_norm_", CONSTANTS.clip_bytes_per_param * P), part="optimizer"),
                           replace(torch_op("AdamW (foreach)", CONSTANTS.adamw_bytes_per_param * P),
                                   part="optimizer")], device)
        out = _sum([out, opt])
    return {**out, "tokens": L * w.groups, "kernels_per_layer_fwd": per_layer}


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def default_score_pass(engine):
    """Whether the trainer runs its no-grad old-log-prob pass (``trainer._old_logps``) at default settings:
    update_epochs 1, no KL reference; truncated importance sampling on with vLLM, off with HF."""
    return engine != "hf"


def step_rows(w=None, devices=("H100", "H200"), engines=ENGINES, score_pass=None, table=None):
    """One row per (device, engine): ms of each part and of the step, fractions, and the sub-terms."""
    w = w or Workload()
    table = table if table is not None else _issue_table()
    rows = []
    for device in devices:
        scoring = packed_pass(w, device, backward=False, table=table)
        update = packed_pass(w, device, backward=True, table=table)
        for engine in engines:
            if engine == "hf":
                r = hf_rollout(w, device)
                roll_s = r["prefill"]["total"] + r["decode"]["total"]
                detail = {"prefill_ms": 1e3 * r["prefill"]["total"], "decode_ms": 1e3 * r["decode"]["total"],
                          "sampling_ms": 1e3 * r["sampling_s"], "weight_sync_ms": 0.0}
            elif engine in ("vllm", "vllm-eager"):
                r = vllm_rollout(w, device, graphs=engine == "vllm")
                roll_s = r["prefill"]["total"] + r["decode"]["total"] + r["weight_sync"]["total"]
                detail = {"prefill_ms": 1e3 * r["prefill"]["total"], "decode_ms": 1e3 * r["decode"]["total"],
                          "sampling_ms": 1e3 * r["sampling_s"], "weight_sync_ms": 1e3 * r["weight_sync"]["total"]}
            else:
                raise ValueError(f"step_model: unknown engine {engine!r}; one of {ENGINES}")
            scored = default_score_pass(engine) if score_pass is None else score_pass
            ms = {"rollouts": 1e3 * roll_s, "scoring": 1e3 * scoring["total"] if scored else 0.0,
                  "update": 1e3 * update["total"]}
            step = sum(ms.values())
            decode = r["decode"]
            memory = rollout_memory_mib(w, engine)
            rows.append({
                "device": device, "engine": engine, **{f"{p}_ms": ms[p] for p in PARTS}, "step_ms": step,
                **{f"{p}_fraction": ms[p] / step for p in PARTS}, "score_pass": scored, **detail,
                "decode_gpu_busy_ms": 1e3 * decode["gpu"], "decode_host_ms": 1e3 * decode["host"],
                "decode_launches_per_step": r["decode_launches_per_step"],
                **{f"rollout_{k}_MiB": v for k, v in memory.items()},
                "rollout_fits": memory["peak"] <= DEVICE_MEMORY_GIB[device] * 1024,
                "packed_tokens": update["tokens"], "update_kernels_per_layer_fwd": update["kernels_per_layer_fwd"],
                "scoring_gpu_ms_by_part": {k: 1e3 * v for k, v in scoring["parts"].items()} if scored else {},
                "update_gpu_ms_by_part": {k: 1e3 * v for k, v in update["parts"].items()},
                "label": "model prediction"})
    return rows


def print_table(rows, w):
    print(f"Whole-step model: PREDICTIONS, not measurements (bench/step_model.py; kernels priced by bench/roofline.py)."
          f"\nWorkload: {asdict(w)}, R={w.R}. ms per training step; fractions of the step; rollout peak in MiB = 2^20 "
          "bytes.")
    print(f"{'device':6} {'engine':10} {'rollouts':>9} {'scoring':>8} {'update':>8} {'step ms':>9} {'roll %':>7} "
          f"{'score %':>7} {'upd %':>6} {'prefill':>8} {'decode':>8} {'sampling':>8} {'launch/step':>11} "
          f"{'peak MiB':>9} fits")
    for r in rows:
        print(f"{r['device']:6} {r['engine']:10} {r['rollouts_ms']:9.1f} {r['scoring_ms']:8.1f} {r['update_ms']:8.1f} "
              f"{r['step_ms']:9.1f} {100 * r['rollouts_fraction']:6.1f}% {100 * r['scoring_fraction']:6.1f}% "
              f"{100 * r['update_fraction']:5.1f}% {r['prefill_ms']:8.1f} {r['decode_ms']:8.1f} "
              f"{r['sampling_ms']:8.1f} {r['decode_launches_per_step']:11d} {r['rollout_peak_MiB']:9.0f} "
              f"{'yes' if r['rollout_fits'] else 'NO'}")
    if not all(r["rollout_fits"] for r in rows):
        print("NO: the rollout phase's memory exceeds the device; its times describe a run that cannot happen.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write {'rows': [...], 'workload', 'constants', 'sources', ...} here")
    for f in fields(Workload):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"default {f.default}")
    ap.add_argument("--score-pass", choices=("auto", "on", "off"), default="auto",
                    help="the old-log-prob pass: auto = as the trainer decides per engine (vLLM's TIS: on; HF: off)")
    args = ap.parse_args(argv)
    if args.json and json_target_error(args.json):
        ap.error(json_target_error(args.json))
    try:
        w = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})
    except ValueError as exc:
        ap.error(str(exc))
    rows = step_rows(w, score_pass={"auto": None, "on": True, "off": False}[args.score_pass])
    print_table(rows, w)
    if args.json:
        doc = {"rows": rows, "workload": {**asdict(w), "R": w.R, "params": w.params()},
               "constants": asdict(CONSTANTS), "sources": SOURCES, "devices": {k: vars(v) for k, v in DEVICES.items()},
               "classes": vars(CLASSES), "units": "ms; bytes (MiB = 2^20 bytes)",
               "note": "whole-step performance model (bench/step_model.py): predictions, not measurements",
               "generated": roofline.provenance(next(iter(_issue_table().values()))["source"])}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=list) + "\n")


if __name__ == "__main__":
    main()
