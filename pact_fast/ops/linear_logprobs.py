"""Fused lm_head + log-softmax + gather: per-token log-probs without [N, V] logits.

``linear_logprobs`` is the public op. Two backends share one contract:

- ``torch``: chunks of rows through ``hidden @ weight.T`` over the whole vocabulary; forward
  keeps only per-row statistics, backward recomputes each chunk's logits. Never more than one
  chunk of logits is alive. A 16-bit lm_head is multiplied in fp32 over vocabulary slabs, so its logits are
  never rounded to 16 bits and no fp32 copy of the whole head is made. The CPU path, and the reference the
  Triton kernels are tested against.
- ``triton``: row blocks x vocabulary slabs over a bounded workspace: cuBLAS GEMMs for the
  logits, dX and dW, Triton epilogues (``pact_fast.kernels.linear_logprobs``) for the online
  log-sum-exp and the gradient of the logits (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
  See ``kernels/linear_logprobs_launch.py`` for where 16-bit gradients are rounded.

Models that transform the lm_head's logits before the softmax are scored exactly: ``logit_scale``
(Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) and ``softcap`` (Gemma2's
``final_logit_softcapping``). Without a soft cap the scale folds into the inverse temperature; with one,
both backends apply ``tanh`` to the logits in forward and its derivative in backward.

Both compact away rows whose target is ``ignore_index`` before any matmul, so those rows
cost nothing and get zero gradient (no copy when no row is ignored).

A frozen lm_head (``weight.requires_grad`` False: LoRA adapters elsewhere, or a frozen head) costs no weight
gradient on either backend: backward skips the dW GEMM and never allocates dW or its accumulator.

Forward and backward are registered as the ops ``pact_fast::linear_logprobs`` and
``pact_fast::linear_logprobs_backward`` (``torch.library.custom_op``, with fake implementations and the
autograd formula; ``pact_fast.ops._custom``), so ``torch.compile(fullgraph=True)`` traces a function that
calls ``linear_logprobs`` without a graph break.
"""
import math
import numbers
import operator
from typing import Optional

import torch

from ._backend import autocast_off, resolve_backend
from ._custom import custom_op

BACKENDS = ("auto", "torch", "triton")
# Past any logit a model produces, finite in fp32: a logit of -inf (a -inf bias) is clamped to -FINITE where it is
# multiplied by its probability 0, so an entropy term is 0 * (-1e30) = 0, not 0 * -inf = NaN.
FINITE = 1e30

# Rows per chunk of the torch path: one fp32 chunk of logits near _CHUNK_BYTES, but never fewer
# than _MIN_CHUNK_ROWS rows (thinner GEMMs run well below the machine's matmul speed).
_CHUNK_BYTES = 64 << 20
_MIN_CHUNK_ROWS = 512
# The torch path multiplies a 16-bit lm_head in fp32 over vocabulary slabs: a slab's fp32 copy within
# _UPCAST_SLAB_BYTES and within a quarter of the chunk's fp32 logits (memory_lean's small chunks), but at least
# _MIN_UPCAST_SLAB columns (so a chunk of a few rows is not thousands of tiny GEMMs)
_UPCAST_SLAB_BYTES = 8 << 20
_MIN_UPCAST_SLAB = 128


def check_logit_transform(op, temperature, logit_scale, softcap):
    """Refuse a temperature, logit scale or soft cap outside its domain (``op`` names the caller)."""
    def positive(value):
        """A finite real number > 0: a Python, NumPy or 0-dim tensor one (not a bool)."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                return False
            value = value.item()
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    for name, value in (("temperature", temperature), ("logit_scale", logit_scale), ("softcap", softcap)):
        if isinstance(value, torch.Tensor) and value.requires_grad:  # read as a number: no gradient would reach it
            raise ValueError(f"{op}: `{name}` is a tensor that requires grad; the op takes it as a constant "
                             "(pass float(t) or t.detach())")
    if not positive(temperature):
        raise ValueError(f"{op}: `temperature` must be a finite number > 0, got {temperature!r}")
    if not positive(logit_scale):
        raise ValueError(f"{op}: `logit_scale` must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and not positive(softcap):
        raise ValueError(f"{op}: `softcap` must be None or a finite number > 0, got {softcap!r}")
    inv_temp, cap = logit_transform(temperature, logit_scale, softcap)
    largest = torch.finfo(torch.float32).max  # the kernels and the torch path take both factors as float32
    if inv_temp > largest:
        raise ValueError(f"{op}: logit_scale / temperature = {inv_temp:.3g} is past float32's range ({largest:.3g}): "
                         "the logits would be inf and the log-probs NaN")
    if cap > largest:
        raise ValueError(f"{op}: softcap / logit_scale = {cap:.3g} is past float32's range ({largest:.3g}): the soft "
                         "cap would be inf and the log-probs NaN")


def logit_transform(temperature, logit_scale, softcap):
    """(inv_temp, cap) such that the op's logits ``softcap * tanh(z_raw * logit_scale / softcap) / temperature``
    (or ``z_raw * logit_scale / temperature`` without a soft cap) are ``cap * tanh(z_raw / cap) * inv_temp``
    (``z_raw * inv_temp`` when cap is 0.0, meaning no soft cap): the logit scale folds into both."""
    inv_temp = float(logit_scale) / float(temperature)
    return inv_temp, (float(softcap) / float(logit_scale) if softcap is not None else 0.0)


def _check_inputs(hidden, weight, targets, bias, temperature, logit_scale, softcap):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("linear_logprobs: `hidden` and `weight` must be tensors")
    if not isinstance(targets, torch.Tensor):
        raise TypeError("linear_logprobs: `targets` must be a tensor of token ids")
    if not hidden.is_floating_point():
        raise TypeError(f"linear_logprobs: `hidden` must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_logprobs: `weight` dtype {weight.dtype} differs from `hidden` dtype {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"linear_logprobs: `weight` must be [V, H], got shape {tuple(weight.shape)}")
    if min(weight.shape) < 1:
        raise ValueError(f"linear_logprobs: `weight` [V, H] needs V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprobs: `hidden` last dim must equal H={weight.shape[1]} of `weight` [V, H], "
            f"got `hidden` shape {tuple(hidden.shape)}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"linear_logprobs: `targets` must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_logprobs: `targets` shape {tuple(targets.shape)} must equal `hidden` shape without its "
            f"last dim {tuple(hidden.shape[:-1])}")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"linear_logprobs: `bias` must be a tensor of shape [V]=({weight.shape[0]},)")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"linear_logprobs: `bias` dtype {bias.dtype} differs from `hidden` dtype {hidden.dtype}")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(f"linear_logprobs: inputs live on different devices: {sorted(map(str, devices))}")
    check_logit_transform("linear_logprobs", temperature, logit_scale, softcap)


def _acc_dtype(dtype):
    """What the torch path computes logits, statistics and dW in: fp32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _torch_chunk_rows(vocab_size, dtype=torch.float32):
    """Rows per chunk of the torch path: a chunk's logits (``_acc_dtype``) within _CHUNK_BYTES, at least
    _MIN_CHUNK_ROWS."""
    return max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (_acc_dtype(dtype).itemsize * vocab_size))


def _compact(targets, ignore_index, vocab_size):
    """Indices [n] of rows that carry a target, after checking every target lies in [0, V)."""
    keep = targets != ignore_index
    kept = targets[keep]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab_size):
        bad = kept[(kept < 0) | (kept >= vocab_size)][0].item()
        raise ValueError(
            f"linear_logprobs: target {bad} is outside [0, V={vocab_size}) and is not ignore_index={ignore_index}")
    return keep.nonzero().squeeze(1)


def upcast_slab_cols(vocab_size, hidden_size, rows, dtype=torch.float32):
    """Vocabulary rows of a 16-bit lm_head upcast to ``dtype`` at a time for a chunk of ``rows`` rows: a copy
    within ``_UPCAST_SLAB_BYTES`` and within a quarter of the chunk's logits, at least ``_MIN_UPCAST_SLAB``."""
    budget = min(_UPCAST_SLAB_BYTES, rows * vocab_size * dtype.itemsize // 4)
    return min(vocab_size, max(_MIN_UPCAST_SLAB, budget // (dtype.itemsize * hidden_size)))


def _slabs(weight, rows, dtype):
    """(v0, v1) over the vocabulary in slabs of ``upcast_slab_cols`` columns: each ``weight[v0:v1].to(dtype)``, made
    inside the GEMM's call (so one is alive at a time), multiplies a 16-bit lm_head in fp32 without a [V, H] fp32
    copy of it."""
    step = upcast_slab_cols(weight.shape[0], weight.shape[1], rows, dtype)
    return [(v0, min(v0 + step, weight.shape[0])) for v0 in range(0, weight.shape[0], step)]


def chunk_logits(x, weight, bias, inv_temp, cap, with_slope=False, dtype=torch.float32):
    """Logits of one chunk of rows x [C, H] in ``dtype``: z [C, V] = z_raw * inv_temp, or with a soft cap
    (cap > 0) cap * tanh(z_raw / cap) * inv_temp (``logit_transform``). Returns (z, slope): with_slope and a cap,
    slope [C, V] = d tanh(y) / dy = 1 / cosh(y)^2 at y = z_raw / cap (no cancellation where tanh saturates);
    else None. 16-bit inputs are multiplied in ``dtype`` slab by slab (``_slabs``): their logits are never
    rounded to 16 bits (bf16 would cost ~0.02 nats per log-prob at logits ~10, fp16 overflows past 65504)."""
    if x.dtype == dtype:
        z = x @ weight.t()
        if bias is not None:
            z = z + bias
    else:
        z = x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)  # [C, V]
        xa = x.to(dtype)  # [C, H]
        for v0, v1 in _slabs(weight, x.shape[0], dtype):
            if bias is not None:
                torch.addmm(bias[v0:v1].to(dtype), xa, weight[v0:v1].to(dtype).t(), out=z[:, v0:v1])
            else:
                torch.mm(xa, weight[v0:v1].to(dtype).t(), out=z[:, v0:v1])
    # z [C, V]: a fresh buffer, scaled in place below
    if not cap:
        return z.mul_(inv_temp), None
    y = z.div_(cap)
    slope = torch.cosh(y).pow_(-2) if with_slope else None  # [C, V]
    return y.tanh_().mul_(cap * inv_temp), slope


def _torch_forward(x, weight, bias, targets, inv_temp, cap, chunk):
    """x [n, H], targets [n] -> (logp [n], lse [n], entropy [n]) in ``_acc_dtype``, one chunk of logits alive
    at a time."""
    n = x.shape[0]
    acc = _acc_dtype(x.dtype)
    logp = x.new_empty(n, dtype=acc)  # [n]
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        z, _ = chunk_logits(x[sl], weight, bias, inv_temp, cap, dtype=acc)  # [C, V]
        m = z.amax(-1)
        z.sub_(m[:, None])  # z - m, in place: at most two [C, V] buffers per chunk
        e = z.exp()
        s = e.sum(-1)
        log_s = s.log()
        logp[sl] = (z.gather(1, targets[sl, None]).squeeze(1) - log_s).clamp_max(0)
        # entropy = log s - sum(e * (z - m)) / s; a logit of -inf (a -inf bias) adds 0 there, not 0 * -inf
        ent[sl] = (log_s - e.mul_(z.clamp_min_(-FINITE)).sum(-1) / s).clamp_min(0)
        lse[sl] = m + log_s
    return logp, lse, ent


def _torch_backward(x, weight, bias, targets, lse, ent, g_logp, g_ent, inv_temp, cap, chunk, weight_grad=True):
    """Gradients for upstream g_logp [n] (and g_ent [n] or None), recomputing each chunk's logits:
    (dx [n, H], dw [V, H]) in the input dtype, db [V] in ``_acc_dtype`` (None without bias). With a soft cap a
    chunk holds one more [C, V] buffer (the tanh slope). ``weight_grad`` False (a frozen lm_head): dw is None, and
    neither its accumulator nor its GEMM is made."""
    acc = _acc_dtype(x.dtype)
    lse, ent, g_logp = lse.to(acc), ent.to(acc), g_logp.to(acc)  # upstream gradients may come in another dtype
    g_ent = g_ent.to(acc) if g_ent is not None else None
    dx = torch.empty_like(x)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else None  # fp32 (float64) acc.
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    for i in range(0, x.shape[0], chunk):
        sl = slice(i, i + chunk)
        z, slope = chunk_logits(x[sl], weight, bias, inv_temp, cap, with_slope=True, dtype=acc)  # [C, V] each
        # dz = p * (g_ent * (E[z] - z) - g_logp) + g_logp * onehot(target), built in place
        if g_ent is not None:  # E[z] - z clamped: +inf at a logit of -inf, where p = 0 makes the term 0
            coef = z.neg().clamp_max_(FINITE).add_((lse[sl] - ent[sl])[:, None]).mul_(g_ent[sl, None]).sub_(
                g_logp[sl, None])
            dz = z.sub_(lse[sl, None]).exp_().mul_(coef)
            del coef
        else:
            dz = z.sub_(lse[sl, None]).exp_().mul_(-g_logp[sl, None])
        dz.scatter_add_(1, targets[sl, None], g_logp[sl, None])
        dz.mul_(inv_temp)  # d z / d z_raw = inv_temp (* the tanh slope with a soft cap)
        if slope is not None:
            dz.mul_(slope)
            del slope
        if x.dtype == acc:
            dx[sl] = dz @ weight
        else:  # a 16-bit lm_head: dz times its fp32 slabs, no [V, H] fp32 copy; dx rounded once
            dx_acc = torch.zeros(dz.shape[0], x.shape[1], dtype=acc, device=x.device)  # [C, H]
            for v0, v1 in _slabs(weight, dz.shape[0], acc):
                dx_acc.addmm_(dz[:, v0:v1], weight[v0:v1].to(acc))
            dx[sl] = dx_acc
        if dw is not None:
            dw.addmm_(dz.t(), x[sl].to(acc))  # in place: no [V, H] temporary per chunk
        if db is not None:
            db += dz.sum(0)
    return dx, dw.to(weight.dtype) if dw is not None else None, db


def _blocking(n, weight, chunk_rows, vocab_slab):
    """The Triton launcher's Blocking for n rows; chunk_rows / vocab_slab 0 take ``plan``'s."""
    from ..kernels import linear_logprobs_launch as launch
    from ..kernels.registry import device_sms

    planned = launch.plan(n, weight.shape[0], weight.shape[1], device_sms(weight.device), weight.element_size())
    return launch.Blocking(chunk_rows or planned.rows, vocab_slab or planned.slab)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             inv_temp: float, cap: float, ignore_index: int, backend: str, chunk_rows: int,
             vocab_slab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op ``pact_fast::linear_logprobs``: hidden [N, H], targets [N] int64 -> (logp [N], lse [N], entropy [N])
    in fp32 (float64 for float64 inputs) of the logits ``cap * tanh(z_raw / cap) * inv_temp`` (``z_raw *
    inv_temp`` for cap 0.0; see ``logit_transform``); rows whose target is ``ignore_index`` skip every matmul and
    get 0. chunk_rows and vocab_slab 0: the backend's default."""
    rows = _compact(targets, ignore_index, weight.shape[0])  # [n]
    n_all, n = hidden.shape[0], rows.numel()
    # [n, H]: ignored rows never reach a matmul
    x = hidden.contiguous() if n == n_all else hidden.index_select(0, rows)
    t = targets.contiguous() if n == n_all else targets.index_select(0, rows)
    w = weight.contiguous()
    with autocast_off(hidden.device):  # the logits in the inputs' dtype, as backward recomputes them
        if backend == "triton":
            from ..kernels import linear_logprobs_launch as launch

            out = launch.forward(x, w, bias, t, inv_temp, blocking=_blocking(n, weight, chunk_rows, vocab_slab),
                                 cap=cap or None)
        else:
            out = _torch_forward(x, w, bias, t, inv_temp, cap,
                                 chunk_rows or _torch_chunk_rows(weight.shape[0], x.dtype))
    if n == n_all:
        return out
    return tuple(v.new_zeros(n_all).index_copy(0, rows, v) for v in out)


def _forward_fake(hidden, weight, bias, targets, inv_temp, cap, ignore_index, backend, chunk_rows, vocab_slab):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=_acc_dtype(hidden.dtype)) for _ in range(3))


def _backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              lse: torch.Tensor, ent: torch.Tensor, g_logp: torch.Tensor, g_ent: Optional[torch.Tensor],
              inv_temp: float, cap: float, ignore_index: int, backend: str, chunk_rows: int,
              vocab_slab: int, weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op ``pact_fast::linear_logprobs_backward``: for upstream g_logp [N] (and g_ent [N] or None),
    (dx [N, H], dw [V, H]) in the input dtype and db [V] in the bias dtype (empty without bias); ignored rows
    get dx 0. ``weight_grad`` False (the lm_head weight is frozen): dw is empty [0] and never computed (no dW
    GEMM, no dW buffer); it defaults to True, so a compiled graph cached from before the argument existed still
    gets every gradient it asks for."""
    rows = (targets != ignore_index).nonzero().squeeze(1)  # [n]
    n_all, n = hidden.shape[0], rows.numel()

    def kept(v):
        return v.contiguous() if n == n_all else v.index_select(0, rows)

    x, t, w = kept(hidden), kept(targets), weight.contiguous()
    args = (x, w, bias, t, kept(lse), kept(ent), kept(g_logp), None if g_ent is None else kept(g_ent), inv_temp)
    with autocast_off(hidden.device):  # a backward run inside an autocast region
        if backend == "triton":
            from ..kernels import linear_logprobs_launch as launch

            dx, dw, db = launch.backward(*args, blocking=_blocking(n, weight, chunk_rows, vocab_slab),
                                         cap=cap or None, weight_grad=weight_grad)
        else:
            dx, dw, db = _torch_backward(*args, cap, chunk_rows or _torch_chunk_rows(weight.shape[0], x.dtype),
                                         weight_grad=weight_grad)
    if n != n_all:
        dx = hidden.new_zeros(hidden.shape).index_copy(0, rows, dx)
    return (dx, dw if weight_grad else weight.new_empty(0),
            db.to(bias.dtype) if bias is not None else weight.new_empty(0))


def _backward_fake(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, inv_temp, cap, ignore_index, backend,
                   chunk_rows, vocab_slab, weight_grad=True):
    return (torch.empty_like(hidden), torch.empty_like(weight) if weight_grad else weight.new_empty(0),
            weight.new_empty(0 if bias is None else weight.shape[0]))


_linear_logprobs_backward = custom_op("linear_logprobs_backward", _backward, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, cap, ignore_index, backend, chunk_rows, vocab_slab = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.args = (inv_temp, cap, ignore_index, backend, chunk_rows, vocab_slab)
    ctx.set_materialize_grads(False)  # an unused entropy output costs nothing in backward


def _autograd_backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    weight_grad = ctx.needs_input_grad[1]  # False for a frozen lm_head: two GEMMs instead of three
    dx, dw, db = _linear_logprobs_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, *ctx.args,
                                           weight_grad)
    return (dx, dw if weight_grad else None, db if bias is not None else None,
            None, None, None, None, None, None, None)


_linear_logprobs = custom_op("linear_logprobs", _forward, fake=_forward_fake, backward=_autograd_backward,
                             setup_context=_setup_context)


def _integer(ignore_index):
    """``ignore_index`` as an int (numpy's and 0-dim tensors' too); None, a bool, a float or an int past int64 (the
    op's argument type) refused in one line."""
    if not isinstance(ignore_index, bool):
        try:
            value = operator.index(ignore_index)
        except TypeError:
            value = None
        if value is not None and -2 ** 63 <= value < 2 ** 63:
            return value
    raise TypeError(f"linear_logprobs: `ignore_index` must be an int (int64; one that no target holds, such as the "
                    f"default -100, ignores no row), got {ignore_index!r}")


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, backend="auto", chunk_rows=None, vocab_slab=None, logit_scale=1.0,
                    softcap=None):
    """Log-probs of chosen tokens under ``softmax(cap(logit_scale * (hidden @ weight.T + bias)) / temperature)``,
    ``cap(z) = softcap * tanh(z / softcap)`` (the identity when ``softcap`` is None).

    Args:
        hidden: ``[N, H]`` (or ``[*, H]``) fp32/fp16/bf16 hidden states, e.g. a model's last hidden state
            (float64 too on the torch backend, e.g. for ``torch.autograd.gradcheck``).
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        targets: ``[N]`` (or ``[*]``) integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        temperature: logits are divided by it (> 0); 1.0 means unchanged.
        ignore_index: rows with this target get logp 0, entropy 0 and zero gradient, at no cost (an int; one
            that no target holds, such as the default, ignores no row).
        return_entropy: also return the entropy of each row's distribution.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise and for float64), ``"torch"`` or ``"triton"``.
        chunk_rows: rows per chunk (torch) or row block (triton); default: torch, one chunk's fp32
            logits near 64 MiB but at least 512 rows; triton, ``linear_logprobs_launch.plan``.
        vocab_slab: vocabulary columns per slab of the triton backend; default from ``plan``.
        logit_scale: the lm_head's logits are multiplied by it first (finite, > 0); 1.0 means unchanged
            (Cohere: ``config.logit_scale``; Granite: ``1 / config.logits_scaling``).
        softcap: ``None`` (no cap) or the soft cap (> 0) applied after the scale and before the temperature
            (Gemma2: ``config.final_logit_softcapping``).

    Returns:
        ``logp [N]`` fp32 (float64 for float64 inputs), or ``(logp [N], entropy [N])`` with ``return_entropy``;
        differentiable with respect to ``hidden``, ``weight`` and ``bias`` for any upstream gradient. A ``weight``
        that does not require grad (a frozen lm_head, e.g. LoRA adapters elsewhere) costs no dW: backward runs two
        GEMMs per block (logits, dX) instead of three and allocates no dW buffer.
    """
    _check_inputs(hidden, weight, targets, bias, temperature, logit_scale, softcap)
    ignore_index = _integer(ignore_index)
    for name, value in (("chunk_rows", chunk_rows), ("vocab_slab", vocab_slab)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"linear_logprobs: `{name}` must be a positive int or None, got {value!r}")
    backend = resolve_backend("linear_logprobs", backend, hidden.device, BACKENDS, "torch", hidden.dtype)
    lead_shape = hidden.shape[:-1]
    inv_temp, cap = logit_transform(temperature, logit_scale, softcap)
    logp, _, entropy = _linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, bias,  # [N, H]
                                        targets.reshape(-1).long(), inv_temp, cap, ignore_index, backend,
                                        chunk_rows or 0, vocab_slab or 0)
    logp = logp.reshape(lead_shape)
    return (logp, entropy.reshape(lead_shape)) if return_entropy else logp


def linear_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                              logit_scale=1.0, softcap=None):
    """Naive path: materialises ``[N, V]`` logits, scales, soft-caps and divides them by the temperature as the
    arguments of ``linear_logprobs`` say, then log_softmax and gather. Returns (logp, entropy) in the dtype of
    the computation; for tests (run it in float64) and as the benchmark's baseline."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    keep = targets != ignore_index
    logp = logprobs.gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    # p log p is 0 where p = 0 (a -inf logit): log p taken as 0 there, so neither the sum nor its gradient is NaN
    entropy = -(logprobs.exp() * torch.where(logprobs > float("-inf"), logprobs, 0.0)).sum(-1)
    return logp * keep, entropy * keep
