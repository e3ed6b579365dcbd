"""The PACT loss fused into the lm_head: loss, metrics, dX and dW in one pass over the vocabulary.

Unfused, a step runs ``linear_logprobs`` (logits, 2NVH), ``pact_loss``, then ``linear_logprobs``'s
backward, which recomputes the logits (2NVH) before forming dX and dW (4NVH): 8NVH. But every PACT
term's gradient with respect to a token's log-prob (and entropy) is a pointwise function of that
token's own values and of per-token constants known before the pass (advantages, old / ref log-probs,
the anchoring draw, SFT weights, aggregation counts). So each bounded chunk of rows can be turned into
logits, log-probs, their upstream gradients and dz once, and dX, dW formed from it at once: 6NVH, no
recompute (SPEC section 7, last paragraph).

The upstream gradients come from ``pact_fast.loss_grads``: ``prepare`` computes the constants once per call
on the device, ``token_terms`` lays them out per token, and this op moves them to one value per row of
``hidden`` (``_RowGrads``), so a row block's gradients are one elementwise expression of its log-probs
(tests/test_loss_grads.py holds them to float64 autograd of ``pact_loss``). Loss and metrics are
``loss_grads.loss_and_metrics`` on the real values, read by one ``tolist``: the only host synchronisation of
a call, whatever its number of row blocks (checks of values are device-side asserts or ride on that read).

Backends: ``torch`` (chunks of rows through ``matmul``; CPU and CUDA) and ``triton``
(``kernels/fused_pact_head_launch.py``: per block of rows, the logits over the whole vocabulary by one
cuBLAS GEMM into a bounded workspace, a Triton epilogue that reads them once for the log-probs and, in the
same pass, leaves a matrix whose row scaling is d loss / d logits, then the dX and dW GEMMs). ``auto``
picks triton on CUDA, torch elsewhere; triton on CPU tensors runs under ``TRITON_INTERPRET=1`` (tests).

Memory: by default the triton backend's row blocks keep its workspace within 25% of dW's bytes
(``fused_pact_head_launch.plan``: one block's logits; the rest parks in dX's unwritten rows);
``memory_lean=True`` keeps the blocks' logits in dW's own unwritten rows and recomputes those rows' vocabulary
columns in a second pass (extra memory within 5% of dW; ``fused_pact_head_launch.lean_plan``), and on the torch
backend takes chunks of rows whose fp32 logits stay within 5% of dW. A
frozen lm_head (``weight.requires_grad`` False) skips dW: no GEMM, no buffer.

A model's logit transform is part of the contract, as in ``linear_logprobs``: ``logit_scale`` folds into the
inverse temperature (the triton backend keeps its row-scaling fast path); ``softcap`` applies ``tanh`` to the
logits and its derivative to d logits, and the triton backend then takes its ordinary epilogue (see
``kernels/fused_pact_head_launch.shift_mode``).
"""
import torch

from .. import loss_grads
from ..losses import NONE, PACTLossConfig
from ._backend import autocast_off, resolve_backend
from .linear_logprobs import FINITE, check_logit_transform, chunk_logits, logit_transform

# A chunk's fp32 logits (and the dz built in place of them) stay under this budget, but hold at least
# MIN_CHUNK_ROWS rows so the GEMMs stay wide enough to run at speed (torch backend).
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 256
# memory_lean on the torch backend: a chunk's live [C, V] buffers within this share of dW's bytes
LEAN_SHARE = 0.05
# The fields of PACTBatch this op fills from the lm_head (everything else comes in with `batch`).
SCORED_FIELDS = ("logp_tc", "logp_po", "sft_logp")


def _chunk_rows(n, vocab, hidden_size, acc, dw_elem, memory_lean):
    """Rows per chunk of the torch backend: fp32 (or float64) logits near CHUNK_BYTES, at least MIN_CHUNK_ROWS;
    memory_lean: the chunk's two live [C, V] buffers (logits and probabilities) within LEAN_SHARE of dW."""
    e = torch.empty((), dtype=acc).element_size()
    if memory_lean:
        return max(1, min(n, int(LEAN_SHARE * vocab * hidden_size * dw_elem) // (2 * e * vocab)))
    return max(1, min(n, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (e * vocab))))


def _check(hidden, weight, targets, bias, rows, batch, temperature, logit_scale, softcap):
    """Host checks on shapes, dtypes and options; value ranges (targets, row indices) as device-side asserts,
    which raise at once on a CPU and fail the stream on a GPU, without a host synchronisation."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_pact_head: hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if min(weight.shape) < 1:
        raise ValueError(f"fused_pact_head: weight [V, H] needs V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("fused_pact_head: hidden, weight and bias must share one dtype")
    if tuple(targets.shape) != (hidden.shape[0],) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"fused_pact_head: targets must be integer [N] = [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    check_logit_transform("fused_pact_head", temperature, logit_scale, softcap)
    unknown = set(rows) - set(SCORED_FIELDS)
    if unknown:
        raise ValueError(f"fused_pact_head: rows has unknown fields {sorted(unknown)}; expected {SCORED_FIELDS}")
    for name, index in rows.items():
        if index.dtype not in (torch.int32, torch.int64):  # uint8 cannot hold -1 (and indexes as a mask), int16
            # failed in index_add_; both with messages that named no argument or the wrong fault
            raise TypeError(f"fused_pact_head: rows[{name!r}] must be an int32 or int64 tensor of row indices "
                            f"(-1 = none), got {index.dtype}")
        if getattr(batch, name) is not None:
            raise ValueError(f"fused_pact_head: batch.{name} is computed by this op from rows[{name!r}]; leave it None")
    if batch.entropy is not None:
        raise ValueError("fused_pact_head: batch.entropy is computed by this op from rows['logp_po'] (config.c_ent > 0);"
                         " leave it None")
    mask_shape = tuple(batch.response_mask.shape)
    for name in ("logp_tc", "logp_po"):
        if name in rows and tuple(rows[name].shape) != mask_shape:
            raise ValueError(f"fused_pact_head: rows[{name!r}] {tuple(rows[name].shape)} must match response_mask "
                             f"{mask_shape}")
    if "sft_logp" in rows and batch.sft_components is not None and \
            rows["sft_logp"].shape != batch.sft_components.shape:
        raise ValueError(f"fused_pact_head: rows['sft_logp'] {tuple(rows['sft_logp'].shape)} must match "
                         f"sft_components {tuple(batch.sft_components.shape)}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.numel():
        ids = targets.long()  # uint8 / int8 ids compared with a V past their range wrapped V (300 -> 44)
        torch._assert_async(((ids >= 0) & (ids < vocab)).all(),
                            f"fused_pact_head: targets must lie in [0, V={vocab})")
    for name, index in rows.items():
        if index.numel():
            torch._assert_async((index < n).all() & (index >= -1).all(),
                                f"fused_pact_head: rows[{name!r}] must hold row indices in [-1, {n}) (-1 = none)")
    # a scored position must name its row: -1 there would score it as log-prob 0
    scored = {"logp_tc": batch.response_mask != 0, "logp_po": batch.response_mask != 0}
    if batch.sft_components is not None:
        scored["sft_logp"] = batch.sft_components != NONE
    for name, index in rows.items():
        if index.numel() and name in scored:
            torch._assert_async(((index >= 0) | ~scored[name]).all(),
                                f"fused_pact_head: rows[{name!r}] is -1 at a position its mask scores "
                                f"({'response_mask' if name != 'sft_logp' else 'sft_components'} nonzero)")


def _scatter(values, index):
    """Per-row values [N] -> the padded layout of ``index`` ([B, T] or [S, E]); 0 where index is -1 (N = 0 too)."""
    padded = torch.cat([values, values.new_zeros(1)])  # [N + 1]: the 0 that -1 picks
    return padded[torch.where(index >= 0, index, values.shape[0])]


class _RowGrads:
    """d loss / d (logp, entropy) per row of ``hidden``: each field's ``loss_grads.token_terms`` moved from
    token positions to the rows they index (a row holds each field's constants of the one token it predicts;
    0 where no token of that field refers to it). ``__call__(lo, hi, logp, ent)`` evaluates rows [lo, hi):
    with torch ops (``kernel`` False), or in one launch of ``fused_pact_head_launch.row_grads`` (``kernel`` True,
    the triton backend: the terms constant in logp summed once here)."""

    def __init__(self, prep, rows, n, want_entropy, kernel=False):
        self.n = n
        self.config = prep.config
        self.terms = {}  # name -> SurrogateTerm over rows [N], or constant gradient [N]
        self.g_ent = None
        for name, term in loss_grads.token_terms(prep).items():
            index = rows["logp_po" if name == "entropy" else name]
            if isinstance(term, loss_grads.SurrogateTerm):
                self.terms[name] = term.map(lambda t, index=index, name=name: self._to_rows(t, index, name))
            elif name == "entropy":
                self.g_ent = self._to_rows(term, index, name)
            else:
                self.terms[name] = self._to_rows(term, index, name)
        if want_entropy and self.g_ent is None:
            self.g_ent = torch.zeros(n, device=prep.batch.response_mask.device)
        self.kernel = kernel
        if kernel:
            unknown = set(self.terms) - {"logp_po", "logp_tc", "sft_logp"}
            if unknown or ("logp_tc" in self.terms and self.terms["logp_tc"].kl_weight is not None):
                raise NotImplementedError(f"fused_pact_head: the row-gradient kernel has no term {sorted(unknown)} "
                                          "(or a KL term on trace-conditioned rows)")
            self.base = self.terms.get("sft_logp")

    def _to_rows(self, values, index, name):
        """values [P-shaped] at positions -> [N] at the rows ``index`` names (-1 = none); a row named twice within a
        field is refused by a device-side assert (each row predicts one token)."""
        flat = torch.where(index >= 0, index, self.n).reshape(-1)
        count = torch.zeros(self.n + 1, dtype=torch.int32, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        torch._assert_async((count[:self.n] <= 1).all(), f"fused_pact_head: rows[{name!r}] names a row twice")
        out = torch.zeros(self.n + 1, dtype=values.dtype, device=values.device)
        return out.scatter_(0, flat, values.expand(index.shape).reshape(-1))[:self.n]

    def __call__(self, lo, hi, logp, ent):
        """(g_logp [hi-lo], g_ent [hi-lo] | None) at rows [lo, hi) of the per-row log-probs ``logp`` [N]."""
        lp = logp[lo:hi]
        g_ent = self.g_ent[lo:hi] if self.g_ent is not None else None
        if self.kernel:
            return self._kernel(lo, hi, lp), g_ent
        g = torch.zeros_like(lp)
        for term in self.terms.values():
            if isinstance(term, loss_grads.SurrogateTerm):
                g = g + term.map(lambda t: t[lo:hi]).grad(lp)
            else:
                g = g + term[lo:hi]
        return g, g_ent

    def _kernel(self, lo, hi, lp):
        from ..kernels import fused_pact_head_launch as launch

        def rows(t):
            return None if t is None else t[lo:hi]

        po, tc, c = self.terms.get("logp_po"), self.terms.get("logp_tc"), self.config
        return launch.row_grads(
            lp, rows(self.base),
            po and tuple(rows(t) for t in (po.weight, po.adv, po.den, po.kl_weight, po.ref)),
            tc and tuple(rows(t) for t in (tc.weight, tc.adv, tc.den)), clip_eps_low=c.clip_eps_low,
            clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip, kl_estimator=c.kl_estimator,
            kl_ratio_weighted=c.kl_ratio_weighted)


def _scale_(t, grad, chunk=1 << 24):
    """``t *= grad`` in place (``grad`` a 0-dim tensor). An fp16 ``t`` is multiplied in fp32, about ``chunk``
    elements (whole rows) at a time: GradScaler's 65536 is inf in fp16, and any loss scale rounded to fp16 would scale the gradients by
    another number. Other dtypes multiply by ``grad`` in their own (bf16 rounds it by at most 2^-9: one factor
    for the whole gradient, not noise)."""
    if t.dtype != torch.float16:
        return t.mul_(grad.to(t.dtype))
    rows = t[:, None] if t.dim() == 1 else t  # [V] or [N, H]: dX keeps a permuted hidden's strides (no view(-1))
    step = max(1, chunk // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        part = rows[i:i + step]
        part.copy_(part.float().mul_(grad))
    return t


class _FusedHead(torch.autograd.Function):
    """Returns the loss computed in forward; backward hands the gradients formed there over, scaled in place by
    grad_output (no second dX- or dW-sized buffer; the engine takes them as .grad without a copy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, dx, dw, db):
        ctx.grads = (dx, dw, db)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the handed-over gradients are constants of the inputs
            raise RuntimeError("fused_pact_head: backward with create_graph=True is refused: its gradients were "
                               "formed in forward and have no second derivative (use linear_logprobs + pact_loss)")
        if ctx.grads is None:
            raise RuntimeError("fused_pact_head: its gradients were formed in forward and handed over by the first "
                               "backward; a second backward (retain_graph) needs a second call of the op")
        dx, dw, db = ctx.grads
        ctx.grads = None
        return (_scale_(dx, grad), _scale_(dw, grad) if dw is not None else None,
                _scale_(db, grad) if db is not None else None, None, None, None, None)


@torch.compiler.disable  # run eagerly inside a compiled region: Inductor compiled loss_grads.prepare wrong
def fused_pact_head(hidden, weight, targets, rows, batch, config=None, progress=0.0, *, bias=None, temperature=1.0,
                    logit_scale=1.0, softcap=None, old_from_current=False, step=0, generator=None, rl_scale=1.0,
                    sft_scale=1.0, chunk_rows=None, memory_lean=False, backend="auto"):
    """``pact_loss`` over log-probs of the lm_head, with dX, dW (and dbias) formed in the forward pass.

    Equal to scoring the rows with ``linear_logprobs``, scattering them into ``batch`` and calling
    ``pact_loss``, but it never recomputes a logit (but with ``memory_lean``), never holds more than one chunk
    of them, and synchronises with the host once (to read the metrics).

    Args:
        hidden: ``[N, H]`` hidden states of the scored rows (e.g. the predictor rows of a packed forward).
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``. A weight that does not require grad
            (a frozen lm_head) gets no dW: no GEMM, no buffer.
        targets: ``[N]`` int token ids in ``[0, V)``, the token each row predicts.
        rows: ``{"logp_tc": [B, T], "logp_po": [B, T], "sft_logp": [S, E]}`` int row indices into ``hidden``,
            ``-1`` where a position holds no scored token; the fields the config needs. Each row is named at most
            once per field. A row of ``hidden`` no index refers to gets a zero gradient (it still goes through
            the matmuls: finding it would take a host synchronisation).
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
            64 MiB, at least 256 rows; triton, ``fused_pact_head_launch.plan``'s blocks (workspace within 25% of
            dW's bytes; a named chunk_rows gives uniform blocks).
        memory_lean: False (default): one pass, a workspace of a row block's logits over the whole vocabulary.
            True: triton keeps the row blocks' logits in dW's last rows and forms those rows in a second pass that
            recomputes their vocabulary columns (``fused_pact_head_launch.lean_plan``: extra memory within 5% of
            dW; a named chunk_rows must fit in dW's rows, at most about H); with a frozen weight, the logits
            recomputed over vocabulary slabs (``linear_logprobs``' blocking, 6NVH FLOPs instead of 4NVH); torch
            takes chunks whose two [C, V] buffers stay within 5% of dW.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere and for float64), ``"torch"`` or ``"triton"``.

    Returns:
        ``(loss, metrics)`` as ``pact_loss`` returns them (and raising what it raises: ``ValueError`` for
        non-finite inputs, ``FloatingPointError`` for a non-finite loss); ``loss`` is differentiable with respect
        to ``hidden``, ``weight`` and ``bias``; a single backward (the gradients are handed over, not copied) and
        no second derivative (``create_graph=True`` is refused).
        torch: logits, log-probs and dW accumulate in fp32 (float64 for float64 inputs). triton: logits rounded
        to the input dtype (as the model's lm_head output would be), fp32 statistics, dW (and db) rounded once
        per row block (see the launcher's doc). dX and dW come back in the input dtype. In fp16 they are formed
        at the loss's own scale (``rl_scale``, ``sft_scale``) before the backward's incoming gradient (a
        GradScaler's loss scale) multiplies them, in fp32: loss scaling cannot lift a d-logit under fp16's
        normal range (6e-5) out of it as it does in the unfused path; prefer bf16.

    Inside ``torch.compile`` the op runs eagerly (a graph break; ``fullgraph=True`` refuses it): it reads its
    metrics on the host, and Inductor compiled its constants wrong (segment-mode SFT weights zeroed: loss 1.7 off).
    """
    config = config or PACTLossConfig()
    backend = resolve_backend("fused_pact_head", backend, hidden.device, ("auto", "torch", "triton"), "torch",
                              hidden.dtype)
    if not isinstance(memory_lean, bool):
        raise TypeError(f"fused_pact_head: memory_lean must be a bool, got {memory_lean!r}")
    if chunk_rows is not None and not (isinstance(chunk_rows, int) and not isinstance(chunk_rows, bool)
                                       and chunk_rows > 0):  # a negative one ran no chunk: the loss was unset memory
        raise ValueError(f"fused_pact_head: chunk_rows must be a positive int or None, got {chunk_rows!r}")
    _check(hidden, weight, targets, bias, rows, batch, temperature, logit_scale, softcap)
    if old_from_current and (batch.old_logp_tc is not None or batch.old_logp_po is not None):
        raise ValueError("fused_pact_head: old_from_current=True fills old_logp_tc / old_logp_po; leave them None")
    # the entropy is scored from the prompt-only rows, which prepare requires whenever the RL term is on
    prep = loss_grads.prepare(batch, config, progress, step=step, generator=generator, rl_scale=rl_scale,
                              sft_scale=sft_scale, old_from_current=old_from_current, scored=tuple(rows) + ("entropy",),
                              dtype=torch.promote_types(hidden.dtype, torch.float32))
    want_entropy = prep.use_rl and config.c_ent > 0  # c_ent is read only by the RL term, as in pact_loss
    grad_on = torch.is_grad_enabled()
    weight_grad = grad_on and weight.requires_grad
    needs_grad = grad_on and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    row_grads = _RowGrads(prep, rows, hidden.shape[0], want_entropy, backend == "triton") if needs_grad else None
    run = _run_triton if backend == "triton" else _run_torch
    inv_temp, cap = logit_transform(temperature, logit_scale, softcap)
    with autocast_off(hidden.device):  # a caller's bf16 autocast would run the torch backend's fp32 GEMMs in bf16
        logp, ent, grads = run(hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, targets,
                               inv_temp, cap, want_entropy, row_grads, chunk_rows, weight_grad, memory_lean)
    with torch.no_grad():
        current = {name: _scatter(logp, index) for name, index in rows.items()}
        if want_entropy:
            current["entropy"] = _scatter(ent, rows["logp_po"])
        loss, pending = loss_grads.loss_and_metrics(prep, **current)
        metrics = pending.resolve()
    if not needs_grad:
        return loss, metrics
    dx, dw, db = grads
    return _FusedHead.apply(hidden, weight, bias, loss, dx, dw, db), metrics


def _run_torch(x, w, b, targets, inv_temp, cap, want_entropy, row_grads, chunk_rows, weight_grad, memory_lean):
    """Chunks of rows through ``matmul``: returns (logp [N], ent [N] | None, (dx, dw | None, db | None) | None).
    Logits ``cap * tanh(z_raw / cap) * inv_temp`` (``z_raw * inv_temp`` for cap 0.0); ``row_grads``: the
    upstream gradients of a chunk's rows (None: forward only); ``weight_grad`` False: no dW."""
    n, vocab = x.shape[0], w.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    logp = torch.empty(n, dtype=acc, device=x.device)  # [N]
    ent = torch.zeros_like(logp) if want_entropy else None
    needs_grad = row_grads is not None
    dx = torch.empty_like(x) if needs_grad else None  # [N, H]
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if needs_grad and weight_grad else None  # [V, H]
    db = torch.zeros(vocab, dtype=acc, device=w.device) if needs_grad and b is not None else None
    chunk = chunk_rows or _chunk_rows(n, vocab, x.shape[1], acc, w.element_size(), memory_lean)
    with torch.no_grad():
        for i in range(0, n, chunk):
            xc = x[i:i + chunk]  # [C, H]
            z, slope = chunk_logits(xc, w, b, inv_temp, cap, with_slope=needs_grad, dtype=acc)  # [C, V] each
            lse = torch.logsumexp(z, dim=-1)  # [C]
            t = targets[i:i + chunk, None].long()
            logp[i:i + chunk] = (z.gather(1, t).squeeze(1) - lse).clamp_max(0)
            p = z.sub(lse[:, None]).exp_()  # [C, V]
            if want_entropy:
                # E[z]: 0 * -inf (p = 0 at a -inf logit) is NaN, read as 0; a NaN logit still makes lse NaN
                mean_z = (p * z).nan_to_num_(nan=0.0).sum(-1)
                ent[i:i + chunk] = (lse - mean_z).clamp_min(0)
            if not needs_grad:
                continue
            g_logp, g_ent = row_grads(i, min(n, i + chunk), logp, ent)
            g_logp = g_logp.to(acc)
            # dz = g_logp * (onehot - p) + g_ent * p * (E[z] - z), times d z / d z_raw; in place of z
            if want_entropy:
                dz = z.neg_().clamp_max_(FINITE).add_(mean_z[:, None]).mul_(g_ent.to(acc)[:, None]).sub_(
                    g_logp[:, None]).mul_(p)
            else:
                dz = p.mul_(-g_logp[:, None])
            dz.scatter_add_(1, t, g_logp[:, None]).mul_(inv_temp)
            if slope is not None:
                dz.mul_(slope)
            del z, p, slope
            dx[i:i + chunk] = dz.to(x.dtype) @ w  # [C, H]
            if dw is not None:
                dw.addmm_(dz.t(), xc.to(acc))  # accumulated over chunks in fp32 (float64 for float64 inputs)
            if db is not None:
                db += dz.sum(0)
    if not needs_grad:
        return logp, ent, None
    return logp, ent, (dx, dw.to(w.dtype) if dw is not None else None, db.to(b.dtype) if db is not None else None)


def _run_triton(x, w, b, targets, inv_temp, cap, want_entropy, row_grads, chunk_rows, weight_grad, memory_lean):
    """Row blocks (memory_lean: ``lean_plan``'s two passes, or with a frozen weight row blocks x vocabulary
    slabs) through ``kernels/fused_pact_head_launch.run``; same contract as ``_run_torch``."""
    from ..kernels import fused_pact_head_launch as launch

    logp, ent, dx, dw, db = launch.run(x.contiguous(), w.contiguous(), b, targets.long().contiguous(), inv_temp,
                                       want_entropy, row_grads, rows_per_block=chunk_rows, cap=cap or None,
                                       weight_grad=weight_grad, memory_lean=memory_lean)
    ent = ent if want_entropy else None
    if row_grads is None:
        return logp, ent, None
    return logp, ent, (dx, dw, db.to(b.dtype) if db is not None else None)
