"""The PACT loss fused into the lm_head: loss, metrics, dX and dW in one pass over the vocabulary.

Unfused, a step runs ``linear_logprobs`` (logits, 2NVH), ``pact_loss``, then ``linear_logprobs``'s
backward, which recomputes the logits (2NVH) before forming dX and dW (4NVH): 8NVH. But every PACT
term's gradient with respect to a token's log-prob (and entropy) is a pointwise function of that
token's own values and of per-row constants known before the pass (advantages, old / ref log-probs,
the anchoring draw, SFT weights, aggregation counts). So each bounded chunk of rows can be turned into
logits, log-probs, their upstream gradients and dz once, and dX, dW formed from it at once: 6NVH, no
recompute (SPEC section 7, last paragraph).

The upstream gradients come from ``pact_loss`` itself: for a chunk, ``pact_loss`` is evaluated on the
whole batch with the chunk's values as autograd leaves (every other token holds a finite stand-in) and
differentiated with respect to those leaves. Because each term is pointwise in a token's own values,
the chunk's gradient does not depend on the stand-ins, so loss, metrics and gradients are those of the
unfused path for every ``PACTLossConfig`` (tests/test_fused_pact_head.py checks them in float64). The
loss and metrics returned are one last ``pact_loss`` call on the real values.

Backends: ``torch`` (chunks of rows through ``matmul``; CPU and CUDA) and ``triton``
(``kernels/fused_pact_head_launch.py``: per block of rows, the logits over the whole vocabulary by one
cuBLAS GEMM into a bounded workspace, a Triton epilogue that reads them once for the log-probs and, in the
same pass, leaves a matrix whose row scaling is d loss / d logits, then the dX and dW GEMMs). ``auto``
picks triton on CUDA, torch elsewhere; triton on CPU tensors runs under ``TRITON_INTERPRET=1`` (tests).

A model's logit transform is part of the contract, as in ``linear_logprobs``: ``logit_scale`` folds into the
inverse temperature (the triton backend keeps its row-scaling fast path); ``softcap`` applies ``tanh`` to the
logits and its derivative to d logits, and the triton backend then takes its ordinary epilogue (see
``kernels/fused_pact_head_launch.shift_mode``).
"""
from dataclasses import fields

import torch

from ..losses import PACTBatch, anchor_draws, anchor_generator, pact_loss
from ._backend import resolve_backend
from .linear_logprobs import check_logit_transform, chunk_logits, logit_transform

# A chunk's fp32 logits (and the dz built in place of them) stay under this budget, but hold at least
# MIN_CHUNK_ROWS rows so the GEMMs stay wide enough to run at speed.
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 256
# The fields of PACTBatch this op fills from the lm_head (everything else comes in with `batch`).
SCORED_FIELDS = ("logp_tc", "logp_po", "sft_logp")


def _chunk_rows(n, vocab):
    return max(1, min(n, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))))


def _check_triton_dtype(hidden):
    from ..kernels.registry import TRITON_DTYPE

    if hidden.dtype not in TRITON_DTYPE:
        raise TypeError(f"fused_pact_head: backend='triton' takes fp32, fp16 or bf16 inputs, got {hidden.dtype}; "
                        "use backend='torch'")


def _check(hidden, weight, targets, bias, rows, batch, temperature, logit_scale, softcap):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_pact_head: hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("fused_pact_head: hidden, weight and bias must share one dtype")
    if tuple(targets.shape) != (hidden.shape[0],) or targets.is_floating_point():
        raise ValueError(f"fused_pact_head: targets must be integer [N] = [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"fused_pact_head: targets must lie in [0, V={weight.shape[0]})")
    check_logit_transform("fused_pact_head", temperature, logit_scale, softcap)
    unknown = set(rows) - set(SCORED_FIELDS)
    if unknown:
        raise ValueError(f"fused_pact_head: rows has unknown fields {sorted(unknown)}; expected {SCORED_FIELDS}")
    for name, index in rows.items():
        if index.is_floating_point():
            raise TypeError(f"fused_pact_head: rows[{name!r}] must be an integer tensor of row indices (-1 = none)")
        if index.numel() and int(index.max()) >= hidden.shape[0]:
            raise ValueError(f"fused_pact_head: rows[{name!r}] points past the {hidden.shape[0]} rows of hidden")
        if getattr(batch, name) is not None:
            raise ValueError(f"fused_pact_head: batch.{name} is computed by this op from rows[{name!r}]; leave it None")
    mask_shape = tuple(batch.response_mask.shape)
    for name in ("logp_tc", "logp_po"):
        if name in rows and tuple(rows[name].shape) != mask_shape:
            raise ValueError(f"fused_pact_head: rows[{name!r}] {tuple(rows[name].shape)} must match response_mask "
                             f"{mask_shape}")
    if "sft_logp" in rows and batch.sft_components is not None and \
            rows["sft_logp"].shape != batch.sft_components.shape:
        raise ValueError(f"fused_pact_head: rows['sft_logp'] {tuple(rows['sft_logp'].shape)} must match "
                         f"sft_components {tuple(batch.sft_components.shape)}")


def _fixed_anchoring(batch, config, step, generator):
    """The Bernoulli anchoring draw ``pact_loss`` would make, drawn once so every call below sees the same."""
    if batch.anchored is not None or config.mode != "pact" or config.anchor_mode != "bernoulli" \
            or batch.response_mask.shape[0] == 0:
        return batch.anchored
    _, group_index = torch.unique(batch.group_ids, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    draws = anchor_draws(n_groups, config.anchor_q, generator or anchor_generator(config.seed, step))
    return draws.to(group_index.device)[group_index]


def _scatter(values, index):
    """Per-row values [N] -> the padded layout of ``index`` ([B, T] or [S, E]); 0 where index is -1."""
    picked = values.index_select(0, index.clamp_min(0).reshape(-1)).reshape(index.shape)
    return torch.where(index >= 0, picked, torch.zeros_like(picked))


class _FusedHead(torch.autograd.Function):
    """Returns the loss computed in forward; backward scales the gradients formed there by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, dx, dw, db):
        ctx.save_for_backward(dx, dw, db if db is not None else dw)
        ctx.has_bias = db is not None
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        dx, dw, db = ctx.saved_tensors
        return (dx * grad.to(dx.dtype), dw * grad.to(dw.dtype), db * grad.to(db.dtype) if ctx.has_bias else None,
                None, None, None, None)


def fused_pact_head(hidden, weight, targets, rows, batch, config=None, progress=0.0, *, bias=None, temperature=1.0,
                    logit_scale=1.0, softcap=None, old_from_current=False, step=0, generator=None, rl_scale=1.0,
                    sft_scale=1.0, chunk_rows=None, backend="auto"):
    """``pact_loss`` over log-probs of the lm_head, with dX, dW (and dbias) formed in the forward pass.

    Equal to scoring the rows with ``linear_logprobs``, scattering them into ``batch`` and calling
    ``pact_loss``, but it never recomputes a logit and never holds more than one chunk of them.

    Args:
        hidden: ``[N, H]`` hidden states of the scored rows (e.g. the predictor rows of a packed forward).
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[N]`` int token ids in ``[0, V)``, the token each row predicts.
        rows: ``{"logp_tc": [B, T], "logp_po": [B, T], "sft_logp": [S, E]}`` int row indices into ``hidden``,
            ``-1`` where a position holds no scored token; the fields the config needs. A row of ``hidden``
            no index refers to gets a zero gradient and never reaches a matmul.
        batch: ``PACTBatch`` with every input except those three fields (and ``entropy``, filled from the
            prompt-only rows when ``config.c_ent > 0``), which must be None.
        config, progress, step, generator, rl_scale, sft_scale: as for ``pact_loss``.
        temperature: logits are divided by it (> 0), last.
        logit_scale: the lm_head's logits are multiplied by it first (finite, > 0; 1.0: unchanged).
        softcap: ``None`` (no cap) or ``c > 0``: logits ``z -> c * tanh(z / c)`` after the scale, before the
            temperature (Gemma2's ``final_logit_softcapping``). The triton backend then forms d logits with
            ``linear_logprobs``' gradient epilogue (its U row-scaling path cannot re-shift rows exactly
            through the tanh), one more read of the logits per row block.
        old_from_current: the old log-probs of both contexts are the current ones, detached (one update epoch
            on fresh rollouts); ``batch.old_logp_tc`` / ``old_logp_po`` must then be None.
        chunk_rows: rows per chunk (torch) or row block (triton); default: torch, a chunk's fp32 logits near
            64 MiB, at least 256 rows; triton, ``fused_pact_head_launch.BLOCK_ROWS`` (2048).
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        ``(loss, metrics)`` as ``pact_loss`` returns them; ``loss`` is differentiable with respect to
        ``hidden``, ``weight`` and ``bias``. torch: logits, log-probs and dW accumulate in fp32 (float64
        for float64 inputs). triton: logits rounded to the input dtype (as the model's lm_head output
        would be), fp32 statistics, dW (and db) rounded once per row block (see the launcher's doc).
        dX and dW come back in the input dtype.
    """
    from ..losses import PACTLossConfig

    config = config or PACTLossConfig()
    backend = resolve_backend("fused_pact_head", backend, hidden.device, ("auto", "torch", "triton"), "torch")
    if backend == "triton":
        _check_triton_dtype(hidden)
    _check(hidden, weight, targets, bias, rows, batch, temperature, logit_scale, softcap)
    if old_from_current and (batch.old_logp_tc is not None or batch.old_logp_po is not None):
        raise ValueError("fused_pact_head: old_from_current=True fills old_logp_tc / old_logp_po; leave them None")
    want_entropy = config.c_ent > 0
    if want_entropy and "logp_po" not in rows:
        raise ValueError("fused_pact_head: c_ent > 0 needs rows['logp_po'] (the entropy of prompt-only rows)")
    base = {f.name: getattr(batch, f.name) for f in fields(batch)}
    base["anchored"] = _fixed_anchoring(batch, config, step, generator)
    kwargs = dict(progress=progress, step=step, rl_scale=rl_scale, sft_scale=sft_scale)

    def loss_of(logp, ent):
        """pact_loss with the scored fields read from per-row values logp [N], ent [N] (or None)."""
        fill = {name: _scatter(logp, index) for name, index in rows.items()}
        if old_from_current:
            for name in ("logp_tc", "logp_po"):
                if name in fill:
                    fill["old_" + name] = fill[name].detach()
        if want_entropy:
            fill["entropy"] = _scatter(ent, rows["logp_po"])
        return pact_loss(PACTBatch(**{**base, **fill}), config, **kwargs)

    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    x, rows, keep = _compact(hidden.detach(), rows)  # rows no index refers to never reach a matmul
    if keep is not None:
        targets = targets[keep]
    run = _run_triton if backend == "triton" else _run_torch
    inv_temp, cap = logit_transform(temperature, logit_scale, softcap)
    logp, ent, grads = run(x, weight.detach(), bias.detach() if bias is not None else None, targets, inv_temp, cap,
                           want_entropy, _stand_ins(x.shape[0], rows, batch, config),
                           loss_of if needs_grad else None, chunk_rows)
    with torch.no_grad():
        loss, metrics = loss_of(logp, ent)
    if not needs_grad:
        return loss, metrics
    dx, dw, db = grads
    if keep is not None:  # zero gradient for the rows left out
        dx = torch.zeros_like(hidden).index_copy_(0, keep, dx)
    return _FusedHead.apply(hidden, weight, bias, loss, dx, dw, db), metrics


def _compact(x, rows):
    """(x [n, H], rows renumbered, keep [n] | None): only the rows of x [N, H] some index in ``rows`` refers
    to, in order; ``keep`` None (and no copy) when every row is referred to."""
    used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for index in rows.values():
        used[index[index >= 0]] = True
    if bool(used.all()):
        return x, rows, None
    keep = used.nonzero().squeeze(1)
    renumber = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    renumber[keep] = torch.arange(keep.numel(), device=x.device)
    return x[keep], {name: torch.where(index >= 0, renumber[index.clamp_min(0)], index) for name, index in
                     rows.items()}, keep


def _run_torch(x, w, b, targets, inv_temp, cap, want_entropy, held, loss_of, chunk_rows):
    """Chunks of rows through ``matmul``: returns (logp [N], ent [N] | None, (dx, dw, db | None) | None).
    Logits ``cap * tanh(z_raw / cap) * inv_temp`` (``z_raw * inv_temp`` for cap 0.0); ``held``: the stand-in
    log-probs the chunks overwrite; ``loss_of``: None for the forward only."""
    n, vocab = x.shape[0], w.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    logp = held.to(acc)  # [N]: real values replace the stand-ins chunk by chunk
    ent = torch.zeros_like(logp) if want_entropy else None
    needs_grad = loss_of is not None
    dx = torch.empty_like(x) if needs_grad else None  # [N, H]
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if needs_grad else None  # [V, H], >= fp32
    db = torch.zeros(vocab, dtype=acc, device=w.device) if needs_grad and b is not None else None
    chunk = chunk_rows or _chunk_rows(n, vocab)
    with torch.no_grad():
        for i in range(0, n, chunk):
            xc = x[i:i + chunk]  # [C, H]
            z, slope = chunk_logits(xc, w, b, inv_temp, cap, with_slope=needs_grad, dtype=acc)  # [C, V] each
            lse = torch.logsumexp(z, dim=-1)  # [C]
            t = targets[i:i + chunk, None]
            logp[i:i + chunk] = (z.gather(1, t).squeeze(1) - lse).clamp_max(0)
            p = z.sub(lse[:, None]).exp_()  # [C, V]
            if want_entropy:
                mean_z = (p * z).sum(-1)  # E[z]
                ent[i:i + chunk] = (lse - mean_z).clamp_min(0)
            if not needs_grad:
                continue
            g_logp, g_ent = _chunk_grads(loss_of, logp, ent, i, min(n, i + chunk))
            # dz = g_logp * (onehot - p) + g_ent * p * (E[z] - z), times d z / d z_raw; in place of z
            if want_entropy:
                dz = z.neg_().add_(mean_z[:, None]).mul_(g_ent[:, None]).sub_(g_logp[:, None]).mul_(p)
            else:
                dz = p.mul_(-g_logp[:, None])
            dz.scatter_add_(1, t, g_logp[:, None]).mul_(inv_temp)
            if slope is not None:
                dz.mul_(slope)
            del z, p, slope
            dx[i:i + chunk] = dz.to(x.dtype) @ w  # [C, H]
            dw.addmm_(dz.t(), xc.to(acc))  # accumulated over chunks in fp32 (float64 for float64 inputs)
            if db is not None:
                db += dz.sum(0)
    if not needs_grad:
        return logp, ent, None
    return logp, ent, (dx, dw.to(w.dtype), db.to(b.dtype) if db is not None else None)


def _run_triton(x, w, b, targets, inv_temp, cap, want_entropy, held, loss_of, chunk_rows):
    """Row blocks through ``kernels/fused_pact_head_launch.run``; same contract as ``_run_torch``. The
    upstream gradients of a block come from ``loss_of`` once the block's log-probs replace their stand-ins."""
    from ..kernels import fused_pact_head_launch as launch

    logp_held = held.float()  # [N]
    ent_held = torch.zeros_like(logp_held) if want_entropy else None

    def grads(lo, hi, logp, ent):
        logp_held[lo:hi] = logp[lo:hi]
        if want_entropy:
            ent_held[lo:hi] = ent[lo:hi]
        return _chunk_grads(loss_of, logp_held, ent_held, lo, hi)

    logp, ent, dx, dw, db = launch.run(x.contiguous(), w.contiguous(), b, targets.long().contiguous(), inv_temp,
                                       want_entropy, grads if loss_of is not None else None,
                                       rows_per_block=chunk_rows, cap=cap or None)
    ent = ent if want_entropy else None
    if loss_of is None:
        return logp, ent, None
    return logp, ent, (dx, dw, db.to(b.dtype) if db is not None else None)


def _stand_ins(n, rows, batch, config):
    """Per-row log-probs [N] to hold until a row's chunk is computed: each rollout token's ratio
    denominator (ratio 1), 0 for trace tokens, so every ``pact_loss`` term stays finite. Their values
    never reach a gradient (each term is pointwise in a token's own log-prob)."""
    dtype = torch.promote_types(batch.response_mask.dtype, torch.float32)
    logp = torch.zeros(n, dtype=dtype, device=batch.response_mask.device)
    behavior = batch.behavior_logp if batch.behavior_logp is not None else batch.old_logp_po
    dens = {"logp_po": batch.old_logp_po,
            "logp_tc": batch.old_logp_tc if config.ctx_den == "same" else behavior}
    for name, den in dens.items():
        if name in rows and den is not None:
            valid = (rows[name] >= 0) & batch.response_mask.bool()
            logp[rows[name][valid]] = den[valid].to(dtype)
    return logp


def _chunk_grads(loss_of, logp, ent, lo, hi):
    """d pact_loss / d (logp, entropy) of rows [lo, hi): ([C], [C]) fp32; zero where a row carries no loss."""
    with torch.enable_grad():
        leaf = logp[lo:hi].clone().requires_grad_()
        full = torch.cat([logp[:lo], leaf, logp[hi:]])
        leaves = [leaf]
        full_ent = None
        if ent is not None:
            ent_leaf = ent[lo:hi].clone().requires_grad_()
            full_ent = torch.cat([ent[:lo], ent_leaf, ent[hi:]])
            leaves.append(ent_leaf)
        loss, _ = loss_of(full, full_ent)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    g_logp = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
    g_ent = None
    if ent is not None:
        g_ent = grads[1] if grads[1] is not None else torch.zeros_like(leaf)
    return g_logp.detach(), (g_ent.detach() if g_ent is not None else None)
