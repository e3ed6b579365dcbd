"""fused_pact_head against the unfused path: naive float64 logits -> log_softmax -> pact_loss -> autograd.

Every PACTLossConfig option family is covered on random batches with ragged masks, an empty rollout,
a group of equal rewards and (in one case) logits of magnitude ~1e3."""
import math

import pytest
import torch

from pact_fast.losses import NONE, OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE, PACTBatch, PACTLossConfig, pact_loss
from pact_fast.ops import linear_logprobs
from pact_fast.ops.fused_pact_head import fused_pact_head

from conftest import rel_err

D = torch.float64
V, H = 37, 11  # odd sizes


def _problem(seed, dtype=D, weight_scale=1.0, bias=False):
    """A random micro-batch: B=5 rollouts x T=6 tokens in two contexts, S=2 traces x E=7, as hidden rows."""
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    mask = (torch.rand(B, T, generator=g) > 0.35).to(D)
    mask[0] = 1.0
    mask[3] = 0.0  # an empty rollout
    components = torch.tensor([[NONE, REASONING, REASONING, TOOL_CALL, TOOL_CALL, OTHER, TOOL_RESPONSE],
                               [REASONING, TOOL_CALL, OTHER, TOOL_RESPONSE, REASONING, TOOL_CALL, NONE]])
    rows, n = {}, 0
    for name, valid in (("logp_po", mask.bool()), ("logp_tc", mask.bool()), ("sft_logp", components != NONE)):
        index = torch.full(valid.shape, -1, dtype=torch.long)
        index[valid] = torch.arange(n, n + int(valid.sum()))
        rows[name], n = index, n + int(valid.sum())
    hidden = torch.randn(n, H, generator=g, dtype=D).to(dtype).requires_grad_()
    weight = (weight_scale * torch.randn(V, H, generator=g, dtype=D) / math.sqrt(H)).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=D)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    batch = PACTBatch(
        response_mask=mask, rewards=torch.tensor([1.0, 0.0, 0.5, 0.7, 0.7], dtype=D),  # group 1: equal rewards
        group_ids=torch.tensor([0, 0, 0, 1, 1]),
        old_logp_tc=-torch.rand(B, T, generator=g, dtype=D) * 4, old_logp_po=-torch.rand(B, T, generator=g, dtype=D) * 4,
        behavior_logp=-torch.rand(B, T, generator=g, dtype=D) * 4, ref_logp=-torch.rand(B, T, generator=g, dtype=D) * 4,
        sft_components=components, sft_segment_ids=torch.tensor([[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]]),
        sft_turn_ids=torch.tensor([[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1]]))
    return hidden, weight, b, targets, rows, batch


def _scatter(values, index):
    padded = torch.cat([values, values.new_zeros(1)])  # the 0 that index -1 picks, also for no rows
    return padded[torch.where(index >= 0, index, values.shape[0])]


def _unfused(hidden, weight, bias, targets, rows, batch, config, progress, temperature, old_from_current,
             logit_scale=1.0, softcap=None, **kw):
    """The float64 reference: materialised logits (scaled, soft-capped), log_softmax, gather, pact_loss."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logprobs = torch.log_softmax(z / temperature, dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    ent = -(logprobs.exp() * torch.where(logprobs > float("-inf"), logprobs, 0.0)).sum(-1)  # 0 log 0 = 0
    fill = {name: _scatter(logp, index) for name, index in rows.items()}
    if old_from_current:
        fill["old_logp_tc"], fill["old_logp_po"] = fill["logp_tc"].detach(), fill["logp_po"].detach()
    if config.c_ent > 0:
        fill["entropy"] = _scatter(ent, rows["logp_po"])
    fields = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    return pact_loss(PACTBatch(**{**fields, **fill}), config, progress, **kw)


CASES = [
    pytest.param(dict(), 0.3, {}, id="pact-default"),
    pytest.param(dict(anchor_mode="mix", loss_agg="seq-mean-token-mean", ctx_den="behavior", dual_clip=3.0), 0.5, {},
                 id="pact-mix-seqmean-behavior-dualclip"),
    pytest.param(dict(loss_agg="seq-mean-token-sum-norm", beta_kl=0.1, kl_estimator="k3", c_ent=0.01), 0.9, {},
                 id="pact-sumnorm-k3-entropy-segment"),
    pytest.param(dict(mode="grpo", beta_kl=0.2, kl_estimator="k1", kl_ratio_weighted=True), 0.1, {},
                 id="grpo-k1-ratio-weighted"),
    pytest.param(dict(mode="sft"), 0.4, {}, id="sft"),
    pytest.param(dict(mode="sft_then_grpo"), 0.2, {}, id="sft_then_grpo-sft-phase"),
    pytest.param(dict(mode="sft_then_grpo", beta_kl=0.05, kl_estimator="k2"), 0.7, {}, id="sft_then_grpo-rl-phase-k2"),
    pytest.param(dict(clip_eps_low=0.1, clip_eps_high=0.28, norm_adv_by_std=False, sft_reasoning_mode="scale",
                      anchor_q=0.9), 0.6, {"temperature": 0.7, "bias": True}, id="pact-asymclip-nostd-scale-temp-bias"),
    pytest.param(dict(c_ent=0.05, anchor_mode="mix"), 0.0, {"old_from_current": True}, id="pact-old-from-current"),
    pytest.param(dict(), 0.5, {"weight_scale": 300.0}, id="pact-large-logits"),
    pytest.param(dict(), 0.5, {"logit_scale": 1.7, "bias": True}, id="pact-logit-scale-bias"),
    pytest.param(dict(), 0.5, {"softcap": 1.5, "weight_scale": 3.0}, id="pact-softcap"),
    pytest.param(dict(c_ent=0.02, beta_kl=0.1, kl_estimator="k3"), 0.3,
                 {"logit_scale": 0.6, "softcap": 2.0, "temperature": 0.8, "bias": True, "weight_scale": 3.0},
                 id="pact-entropy-k3-scale-softcap-temp-bias"),
    pytest.param(dict(), 0.5, {"weight_scale": 300.0, "logit_scale": 0.5, "softcap": 30.0},
                 id="pact-large-logits-softcap"),
]


def _transform(opts):
    """The logit transform keywords of a case, for the op and for ``_unfused`` alike."""
    return dict(temperature=opts.get("temperature", 1.0), logit_scale=opts.get("logit_scale", 1.0),
                softcap=opts.get("softcap"))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("old_from_current", [False, True])
def test_a_float64_head_is_float64_exact_whatever_the_masks_dtype(mask_dtype, old_from_current):
    """The aggregation weights were made in fp32 for a float32 or integer mask (1e-8 off in the loss, 3e-7 in
    the gradients against float64)."""
    config = PACTLossConfig(loss_agg="seq-mean-token-mean", c_ent=0.01)
    hidden, weight, _, targets, rows, batch = _problem(5)
    batch.response_mask = batch.response_mask.to(mask_dtype)
    if old_from_current:
        batch.old_logp_tc = batch.old_logp_po = None
    ref_loss, _ = _unfused(hidden, weight, None, targets, rows, batch, config, 0.4, 1.0, old_from_current)
    ref = torch.autograd.grad(ref_loss, [hidden, weight])
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4, old_from_current=old_from_current)
    got = torch.autograd.grad(loss, [hidden, weight])
    assert abs(loss.item() - ref_loss.item()) < 1e-14
    for g, r in zip(got, ref):
        assert ((g - r).norm() / r.norm()).item() < 1e-12


@pytest.mark.parametrize("cfg,progress,opts", CASES)
def test_fused_head_equals_the_unfused_path_in_float64(cfg, progress, opts):
    config = PACTLossConfig(**cfg)
    transform = _transform(opts)
    old_from_current = opts.get("old_from_current", False)
    for seed in (0, 1):
        hidden, weight, bias, targets, rows, batch = _problem(seed, weight_scale=opts.get("weight_scale", 1.0),
                                                              bias=opts.get("bias", False))
        if old_from_current:
            batch.old_logp_tc = batch.old_logp_po = None
        params = [hidden, weight] + ([bias] if bias is not None else [])
        ref_loss, ref_metrics = _unfused(hidden, weight, bias, targets, rows, batch, config, progress,
                                         old_from_current=old_from_current, step=seed + 3, **transform)
        ref_grads = torch.autograd.grad(ref_loss, params)
        loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, progress, bias=bias,
                                        old_from_current=old_from_current, step=seed + 3,
                                        chunk_rows=7, **transform)  # several ragged chunks
        grads = torch.autograd.grad(3.0 * loss, params)  # backward scales by the incoming grad
        assert torch.isclose(loss, ref_loss, rtol=1e-10, atol=1e-12), (loss.item(), ref_loss.item())
        assert metrics.keys() == ref_metrics.keys()
        for k in ref_metrics:
            assert math.isclose(metrics[k], ref_metrics[k], rel_tol=1e-9, abs_tol=1e-12), (k, metrics[k], ref_metrics[k])
        for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
            err = (got - 3.0 * want).norm() / (3.0 * want).norm().clamp_min(1e-300)
            assert err < 1e-10, (name, err.item())
            assert want.abs().max() > 0 or cfg.get("mode") == "sft", name  # the case carries a gradient


def test_fp32_fused_head_matches_linear_logprobs_plus_pact_loss():
    config = PACTLossConfig(c_ent=0.01, beta_kl=0.05)
    hidden, weight, bias, targets, rows, batch = _problem(5, dtype=torch.float32, bias=True)
    for name in ("old_logp_tc", "old_logp_po", "behavior_logp", "ref_logp"):
        setattr(batch, name, getattr(batch, name).float())
    batch.response_mask, batch.rewards = batch.response_mask.float(), batch.rewards.float()
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend="torch")
    fill = {name: _scatter(logp, index) for name, index in rows.items()}
    fill["entropy"] = _scatter(ent, rows["logp_po"])
    ref_loss, _ = pact_loss(PACTBatch(**{**{f: getattr(batch, f) for f in batch.__dataclass_fields__}, **fill}),
                            config, 0.4, step=1)
    ref = torch.autograd.grad(ref_loss, [hidden, weight, bias])
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4, bias=bias, step=1)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    for g, r in zip(got, ref):
        assert ((g - r).norm() / r.norm()).item() < 1e-4


def test_anchoring_drawn_inside_equals_pact_losss_own_draw():
    # with anchor_q = 0.5 the two groups' draws differ across steps; the fused op must draw what pact_loss draws
    config = PACTLossConfig(anchor_q=0.5)
    hidden, weight, _, targets, rows, batch = _problem(2)
    for step in range(6):
        ref, ref_m = _unfused(hidden, weight, None, targets, rows, batch, config, 0.5, 1.0, False, step=step)
        got, got_m = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.5, step=step)
        assert torch.isclose(got, ref, rtol=1e-10) and got_m["anchored_groups"] == ref_m["anchored_groups"]


def test_no_grad_gives_the_loss_without_gradient_buffers():
    config = PACTLossConfig()
    hidden, weight, _, targets, rows, batch = _problem(3)
    ref, _ = _unfused(hidden, weight, None, targets, rows, batch, config, 0.2, 1.0, False)
    with torch.no_grad():
        loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.2)
    assert not loss.requires_grad and torch.isclose(loss, ref.detach(), rtol=1e-10)


@pytest.mark.parametrize("mode,progress", [("sft", 0.4), ("sft_then_grpo", 0.2)])
def test_an_entropy_coefficient_needs_no_prompt_only_rows_while_the_rl_term_is_off(mode, progress):
    """pact_loss ignores c_ent while no RL term is on (mode sft, sft_then_grpo before its switch); fused_pact_head
    refused such a call without rows['logp_po'] (c_ent > 0 needs rows['logp_po'])."""
    hidden, weight, _, targets, rows, batch = _problem(6)
    sft_rows = {"sft_logp": rows["sft_logp"]}
    loss, _ = fused_pact_head(hidden, weight, targets, sft_rows, batch, PACTLossConfig(mode=mode, c_ent=0.05),
                              progress)
    ref, _ = _unfused(hidden, weight, None, targets, sft_rows, batch, PACTLossConfig(mode=mode), progress, 1.0, False)
    assert rel_err(loss, ref) < 1e-12
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(backend="triton"), "fp32, fp16 or bf16"),  # float64 inputs
    (lambda a: a.update(backend="cuda"), "unknown backend"),
    (lambda a: a["rows"].update(logp_po=a["rows"]["logp_po"][:, :-1]), "must match response_mask"),
    (lambda a: a["rows"].update(logp_po=a["rows"]["logp_po"] + 1000), r"row indices in \[-1, "),
    (lambda a: a["rows"].update(logp_po=a["rows"]["logp_po"] - 1000), r"row indices in \[-1, "),
    (lambda a: a["rows"].update(logp_po=torch.where(a["batch"].response_mask.bool(), -1, a["rows"]["logp_po"])),
     "is -1 at a position its mask scores"),
    (lambda a: a["rows"].update(sft_logp=torch.full_like(a["rows"]["sft_logp"], -1)),
     "is -1 at a position its mask scores"),
    (lambda a: a["rows"].update(entropy=a["rows"]["logp_po"]), "unknown fields"),
    (lambda a: setattr(a["batch"], "logp_po", a["batch"].old_logp_po), "leave it None"),
    (lambda a: setattr(a["batch"], "entropy", torch.full_like(a["batch"].old_logp_po, 100.0)),
     r"batch.entropy is computed by this op"),  # was taken and ignored
    (lambda a: a.update(targets=a["targets"] + V), "targets must lie in"),
    (lambda a: a.update(temperature=0.0), "temperature"),
    (lambda a: a.update(logit_scale=0.0), "logit_scale"),
    (lambda a: a.update(logit_scale=float("inf")), "logit_scale"),
    (lambda a: a.update(softcap=-1.0), "softcap"),
    (lambda a: a.update(softcap=0.0), "softcap"),
    (lambda a: a.update(old_from_current=True), "old_from_current"),
    (lambda a: a.update(weight=a["weight"][:, :0], hidden=a["hidden"][:, :0]), "V >= 1 and H >= 1"),
    (lambda a: a.update(targets=a["targets"] > 0), "targets must be integer"),  # bool scored tokens 0 and 1
    (lambda a: setattr(a["batch"], "response_mask", a["batch"].response_mask * 0.5), "0 and 1 only"),
], ids=["triton-float64", "backend", "rows-shape", "rows-range", "rows-below", "rows-unscored", "sft-unscored",
        "rows-field", "batch-field", "batch-entropy", "targets", "temperature",
        "scale-zero", "scale-inf", "softcap-negative", "softcap-zero", "old-given", "H-zero", "targets-bool",
        "mask-weights"])
def test_bad_input_is_an_error_naming_it(change, match):
    hidden, weight, _, targets, rows, batch = _problem(4)
    args = dict(rows=rows, batch=batch, targets=targets, backend="auto", temperature=1.0, logit_scale=1.0,
                softcap=None, old_from_current=False, hidden=hidden, weight=weight)
    change(args)
    # RuntimeError: a device-side assert (value checks that would otherwise synchronise with the host)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fused_pact_head(args["hidden"], args["weight"], args["targets"], args["rows"], args["batch"], PACTLossConfig(), 0.1,
                        temperature=args["temperature"], logit_scale=args["logit_scale"], softcap=args["softcap"],
                        old_from_current=args["old_from_current"], backend=args["backend"])


@pytest.mark.parametrize("chunk_rows", [-5, 0, 2.5, True])
def test_a_chunk_rows_that_is_not_a_positive_int_is_refused(chunk_rows):
    """chunk_rows=-5 ran no chunk on the torch backend and returned the unset log-prob buffer's loss (2.9e26 here,
    for 3.83); 2.5 and True were a TypeError inside the backends or chunks of one row."""
    hidden, weight, _, targets, rows, batch = _problem(4)
    with pytest.raises(ValueError, match=f"chunk_rows must be a positive int or None, got {chunk_rows!r}"):
        fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.1, chunk_rows=chunk_rows,
                        backend="torch")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32, torch.bool], ids=["u8", "i16", "f32", "bool"])
def test_row_indices_of_another_dtype_than_int32_or_int64_are_refused_naming_the_field(dtype):
    """uint8 indices were refused as 'outside [-1, N)' though every one was inside (uint8 has no -1), int16 ones
    failed inside index_add_; int32 works as int64 does."""
    hidden, weight, _, targets, rows, batch = _problem(4)
    bad = dict(rows, logp_tc=rows["logp_tc"].clamp_min(0).to(dtype))
    with pytest.raises(TypeError, match=rf"rows\['logp_tc'\] must be an int32 or int64 tensor .* got {dtype}"):
        fused_pact_head(hidden, weight, targets, bad, batch, PACTLossConfig(), 0.1, backend="torch")
    as_int32 = {name: index.int() for name, index in rows.items()}
    got = fused_pact_head(hidden, weight, targets, as_int32, batch, PACTLossConfig(), 0.1, backend="torch")[0]
    want = fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.1, backend="torch")[0]
    assert got.item() == want.item()


# ------------------------------------------------------------------ the Triton backend (interpreter on CPU)

# fp32: tight; 16-bit: the logits are rounded to the input dtype before the softmax, dz (or U) and dW too
TRITON_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _as_fp32_batch(batch):
    for name in ("response_mask", "rewards", "old_logp_tc", "old_logp_po", "behavior_logp", "ref_logp"):
        if getattr(batch, name) is not None:
            setattr(batch, name, getattr(batch, name).float())
    return batch


def _check_low_precision(cfg, progress, opts, dtype, backend):
    """Loss, metrics and the gradients of hidden, weight (and bias) against float64 autograd of the unfused
    path on the same (rounded) inputs, in row blocks of 7 (ragged); triton with the interpreter's small tiles."""
    config = PACTLossConfig(**cfg)
    transform = _transform(opts)
    old_from_current = opts.get("old_from_current", False)
    hidden, weight, bias, targets, rows, batch = _problem(1, dtype=dtype, weight_scale=opts.get("weight_scale", 1.0),
                                                          bias=opts.get("bias", False))
    batch = _as_fp32_batch(batch)
    if old_from_current:
        batch.old_logp_tc = batch.old_logp_po = None
    params = [hidden, weight] + ([bias] if bias is not None else [])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_loss, ref_metrics = _unfused(*ref_params[:2], ref_params[2] if bias is not None else None, targets, rows,
                                     batch, config, progress, old_from_current=old_from_current, step=4, **transform)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, progress, bias=bias,
                                    old_from_current=old_from_current, step=4, chunk_rows=7, backend=backend,
                                    **transform)
    grads = torch.autograd.grad(2.0 * loss, params)
    tol = TRITON_TOL[dtype]
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item())), (loss.item(), ref_loss.item())
    assert metrics.keys() == ref_metrics.keys()
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert want.abs().max() > 0 or cfg.get("mode") == "sft", name  # the case carries a gradient
        assert rel_err(got, 2.0 * want) < tol, (name, rel_err(got, 2.0 * want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg,progress,opts", CASES)
def test_triton_backend_equals_the_float64_reference(cfg, progress, opts, dtype):
    _check_low_precision(cfg, progress, opts, dtype, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg,progress,opts", [c for c in CASES if {"logit_scale", "softcap"} & set(c.values[2])])
def test_torch_backend_with_logit_transforms_in_fp32_and_fp16(cfg, progress, opts, dtype):
    """The torch backend's logit scale and soft cap on fp32 / fp16 inputs (the float64 test above holds it to
    1e-10 on float64 inputs)."""
    _check_low_precision(cfg, progress, opts, dtype, "torch")


@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted-hidden"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_gradients_take_gradscalers_loss_scale(backend, permuted):
    """The gradients formed in forward are multiplied by the incoming gradient in backward: in fp16 that was done
    after rounding it to fp16, where GradScaler's default scale 65536 is inf (every gradient NaN). Now the scaled
    gradients, unscaled in fp32, are the float64 reference's."""
    config = PACTLossConfig()
    hidden, weight, _, targets, rows, batch = _problem(2, dtype=torch.float16)
    if permuted:  # dX takes its strides (empty_like): the fp32 multiply flattened it with view(-1) and failed
        hidden = hidden.detach().t().contiguous().t().requires_grad_()
    batch = _as_fp32_batch(batch)
    ref_params = [p.detach().double().requires_grad_() for p in (hidden, weight)]
    ref_loss, _ = _unfused(*ref_params, None, targets, rows, batch, config, 0.3, 1.0, False, step=4)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    scale = 65536.0  # torch.amp.GradScaler's init_scale
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, step=4, chunk_rows=7, backend=backend)
    grads = torch.autograd.grad(loss * scale, (hidden, weight))
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name
        assert rel_err(got.float() / scale, want) < TRITON_TOL[torch.float16], (name, rel_err(got.float() / scale, want))


def test_triton_backend_matches_the_torch_backend_metrics_in_fp32():
    config = PACTLossConfig(c_ent=0.02, beta_kl=0.1, anchor_mode="mix")
    hidden, weight, bias, targets, rows, batch = _problem(6, dtype=torch.float32, bias=True)
    batch = _as_fp32_batch(batch)
    got, got_m = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=bias, step=2, backend="triton")
    ref, ref_m = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=bias, step=2, backend="torch")
    assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for k in ref_m:
        assert math.isclose(got_m[k], ref_m[k], rel_tol=1e-4, abs_tol=1e-6), (k, got_m[k], ref_m[k])


@pytest.mark.parametrize("limit", [20.0, 2.0, -1.0], ids=["none-over", "some-over", "all-over"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32-bias", "bf16"])
def test_rows_over_the_shift_limit_are_re_shifted_exactly(limit, dtype, bias):
    """The pass's second loop (rows whose max logit exceeds the target's by more than the limit) gives the same
    gradients: launcher against float64 autograd of g . logp for a random upstream g, temperature 0.8."""
    from pact_fast.kernels import fused_pact_head_launch as launch

    g = torch.Generator().manual_seed(7)
    N, V, H = 23, 53, 12
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / 2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    g_logp = torch.randn(N, generator=g)
    ref = [p.double().requires_grad_() for p in (x, w) + ((b,) if bias else ())]
    z = ref[0] @ ref[1].t() + (ref[2] if bias else 0)
    logp_ref = torch.log_softmax(z / 0.8, -1).gather(1, t[:, None]).squeeze(1)
    want = torch.autograd.grad((g_logp.double() * logp_ref).sum(), ref)
    z_round = (x @ w.t() + (b if bias else 0)).float() / 0.8
    over = (z_round.max(-1).values - z_round.gather(1, t[:, None]).squeeze(1)) > limit
    assert over.any() == (limit < 20.0) and over.all() == (limit < 0)
    logp, _, dx, dw, db = launch.run(x, w, b, t, 1 / 0.8, False, lambda lo, hi, lp, en: (g_logp[lo:hi], None),
                                     rows_per_block=9, limit=limit)
    # the log-probs of the logits as the workspace holds them (rounded to the input dtype)
    assert rel_err(logp, torch.log_softmax(z_round.double(), -1).gather(1, t[:, None]).squeeze(1)) < 1e-6
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, got, ref_grad in zip(("x", "w", "b"), (dx, dw, db), want):
        assert rel_err(got, ref_grad) < tol, (name, rel_err(got, ref_grad))


def _run_on_logits(Z, t, g_logp, dtype, inv_temp=1.0, bias=None):
    """The shift-mode launcher on a workspace that holds exactly ``Z`` [N, V] (rounded to ``dtype``; x = I,
    w = Z^T, plus ``bias``), and float64 references from that workspace: (logp, dz) of the launcher (dz = dW^T
    = d loss / d logits) and (logp, dz) of softmax, the target's 1 - p summed over the other columns."""
    from pact_fast.kernels import fused_pact_head_launch as launch

    N, V = Z.shape
    x, w = torch.eye(N, dtype=dtype), Z.to(dtype).t().contiguous()
    logp, _, dx, dw, db = launch.run(x, w, bias, t, inv_temp, False, lambda lo, hi, lp, en: (g_logp[lo:hi], None))
    z = (Z.to(dtype).double() + (0 if bias is None else bias.double())) * inv_temp
    ls = torch.log_softmax(z, -1)
    p, onehot = ls.exp(), torch.nn.functional.one_hot(t, V).bool()
    dz = g_logp.double()[:, None] * inv_temp * torch.where(onehot, torch.where(onehot, 0.0, p).sum(1, keepdim=True), -p)
    return (logp, dw.t(), dx, db), (ls.gather(1, t[:, None]).squeeze(1), dz)


@pytest.mark.parametrize("magnitude", [30.0, 1000.0, 3000.0])
def test_shift_pass_keeps_fp32_accuracy_at_large_logits(magnitude):
    """Confident rows (the target the max, the others 4-12 below it) at logits of magnitude ``magnitude``, fp32:
    U relative to the target must not inherit the logits' rounding (x = (z - c) k, not z k - c k: the latter gave
    3e-5 and 7e-5 relative error at 1000 and 3000, against ~5e-8 for the exact difference)."""
    gen = torch.Generator().manual_seed(5)
    N, V = 8, 45
    t = torch.randint(0, V, (N,), generator=gen)
    Z = magnitude - 4.0 - 8.0 * torch.rand(N, V, generator=gen)
    Z[torch.arange(N), t] = magnitude
    Z[1::2] -= 2 * magnitude  # half the rows at -magnitude
    (logp, dz, _, _), (logp_ref, dz_ref) = _run_on_logits(Z, t, torch.linspace(-1.0, 1.5, N), torch.float32)
    assert rel_err(dz, dz_ref) < 1e-6
    assert (logp.double() - logp_ref).abs().max() < 1e-6 * (1 + (logp_ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spread", [1.0, 40.0], ids=["within-limit", "past-limit"])
def test_shift_pass_with_a_target_of_minus_infinity(dtype, spread):
    """A row whose target logit is -inf (a -inf bias masks a token the batch holds; its upstream gradient 0, as a
    loss that drops it gives): logp -inf, every gradient finite, and the other rows exact. ``spread``: the row's
    other logits within the shift limit of 0, or past it (the second loop)."""
    gen = torch.Generator().manual_seed(9)
    N, V = 5, 23
    Z = spread * torch.randn(N, V, generator=gen)
    bias = torch.zeros(V, dtype=dtype)
    bias[4] = float("-inf")
    t = torch.tensor([4, 7, 0, 22, 13])
    g_logp = torch.tensor([0.0, 1.0, -0.5, 0.8, 2.0])
    (logp, dz, dx, db), (logp_ref, dz_ref) = _run_on_logits(Z, t, g_logp, dtype, bias=bias)
    assert logp[0] == float("-inf") and torch.isfinite(logp[1:]).all()
    assert all(torch.isfinite(v.float()).all() for v in (dz, dx, db))
    assert rel_err(logp[1:], logp_ref[1:]) < 1e-6
    dz_ref = torch.where(torch.isnan(dz_ref), 0.0, dz_ref)  # row 0: g = 0 times (onehot - p)
    assert rel_err(dz, dz_ref) < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("want_entropy", [False, True], ids=["logp", "logp-ent"])
def test_softcap_launcher_matches_float64(dtype, want_entropy):
    """The triton launcher with a soft cap (and a logit scale, temperature 0.7, bias): log-probs (<= 0),
    entropies and the gradients of x, w, b for random upstream gradients of both, against float64 autograd of
    ``linear_logprobs_reference``; logits up to ~400 before the scale, so the cap of 30 saturates. A cap takes
    the ordinary epilogue even where shift mode would otherwise run (no entropy bonus, fp32 / bf16)."""
    from pact_fast.kernels import fused_pact_head_launch as launch
    from pact_fast.ops.linear_logprobs import linear_logprobs_reference, logit_transform

    g = torch.Generator().manual_seed(13)
    N, Vb, Hb = 29, 203, 24
    x = torch.randn(N, Hb, generator=g).to(dtype)
    w = (torch.randn(Vb, Hb, generator=g) * 20).to(dtype)
    b = torch.randn(Vb, generator=g).to(dtype)
    t = torch.randint(0, Vb, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    transform = dict(temperature=0.7, logit_scale=0.5, softcap=30.0)
    inv_temp, cap = logit_transform(**transform)
    logp, ent, dx, dw, db = launch.run(x, w, b, t, inv_temp, want_entropy,
                                       lambda lo, hi, lp, en: (g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None),
                                       cap=cap, rows_per_block=11)
    ref = [p.double().requires_grad_() for p in (x, w, b)]
    logp_r, ent_r = linear_logprobs_reference(*ref[:2], t, bias=ref[2], **transform)
    upstream = (g_logp.double() * logp_r).sum() + ((g_ent.double() * ent_r).sum() if want_entropy else 0)
    want = torch.autograd.grad(upstream, ref)
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert (logp <= 0).all() and rel_err(logp, logp_r) < tol
    if want_entropy:
        assert (ent >= 0).all() and rel_err(ent, ent_r) < tol
    else:  # the pass keeps no entropy sum when nothing asks for it
        assert ent.isnan().all()
    for name, got, ref_grad in zip(("x", "w", "b"), (dx, dw, db), want):
        assert rel_err(got, ref_grad) < tol, (name, rel_err(got, ref_grad))


@pytest.mark.parametrize("backend,dtype", [("torch", D), ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch-f64", "triton-fp32", "triton-bf16"])
def test_logit_scale_without_softcap_is_an_inverse_temperature(backend, dtype):
    """logit_scale 4 with softcap=None is temperature 1/4, bit for bit (loss, metrics, every gradient), the
    triton backend on its shift path (no entropy bonus) and in bf16 too."""
    config = PACTLossConfig(beta_kl=0.1)
    results = []
    for transform in (dict(logit_scale=4.0), dict(temperature=0.25)):
        hidden, weight, bias, targets, rows, batch = _problem(10, dtype=dtype, bias=True)
        batch = _as_fp32_batch(batch) if backend == "triton" else batch
        loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=bias, step=1,
                                        chunk_rows=7, backend=backend, **transform)
        results.append((loss, metrics, torch.autograd.grad(loss, [hidden, weight, bias])))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and metrics_a == metrics_b
    for got, want in zip(grads_a, grads_b):
        assert torch.equal(got, want)


def test_auto_backend_is_torch_on_cpu_even_when_interpreting(monkeypatch):
    from pact_fast.kernels import fused_pact_head_launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("auto ran the Triton backend on CPU tensors")

    monkeypatch.setattr(launch, "run", refuse)
    hidden, weight, _, targets, rows, batch = _problem(3)
    fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.2, backend="auto")
    with pytest.raises(AssertionError, match="auto ran"):
        fused_pact_head(hidden.float(), weight.float(), targets, rows, _as_fp32_batch(batch), PACTLossConfig(), 0.2,
                        backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_no_index_refers_to_get_zero_gradient(backend):
    """Five extra rows of hidden (at the start, the middle and the end) that no index refers to: the loss and
    the other gradients are unchanged, theirs are exactly zero (they go through the matmuls with a zero
    upstream gradient: finding them would cost a host synchronisation)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden, weight, _, targets, rows, batch = _problem(8, dtype=dtype)
    batch = _as_fp32_batch(batch) if backend == "triton" else batch
    config = PACTLossConfig(c_ent=0.01)
    n = hidden.shape[0]
    g = torch.Generator().manual_seed(9)
    extra = torch.randn(5, H, generator=g, dtype=dtype)
    wide = torch.cat([extra[:2], hidden.detach()[:10], extra[2:3], hidden.detach()[10:], extra[3:]]).requires_grad_()
    new_row = torch.cat([torch.arange(2, 12), torch.arange(13, n + 3)])  # where each old row now lives
    wide_rows = {name: torch.where(index >= 0, new_row[index.clamp_min(0)], index) for name, index in rows.items()}
    wide_targets = torch.zeros(n + 5, dtype=torch.long)
    wide_targets[new_row] = targets
    ref, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4, step=1, backend=backend)
    got, _ = fused_pact_head(wide, weight, wide_targets, wide_rows, batch, config, 0.4, step=1, backend=backend)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    dwide, dweight = torch.autograd.grad(got, [wide, weight])
    tol = 1e-12 if backend == "torch" else 1e-6
    assert torch.isclose(got, ref, rtol=tol) and rel_err(dweight, ref_grads[1]) < tol
    assert rel_err(dwide[new_row], ref_grads[0]) < tol
    assert dwide[[0, 1, 12, n + 3, n + 4]].abs().max() == 0


def test_torch_backend_scores_a_bf16_head_in_fp32():
    """A bf16 lm_head and rows on the torch backend (a CPU LoRA run on a bf16 base): the logits are multiplied in
    fp32 over vocabulary slabs, so loss and SFT loss equal float64 of the same bf16 inputs to fp32 rounding (the
    logits were rounded to bf16 first: loss off by 2.6e-5 relative here, SFT loss by 1.3e-4)."""
    config = PACTLossConfig()
    hidden, weight, _, targets, rows, batch = _problem(0, dtype=torch.bfloat16, weight_scale=8.0)
    loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, backend="torch")
    ref, ref_metrics = _unfused(hidden.detach().double(), weight.detach().double(), None, targets, rows, batch, config,
                                0.3, 1.0, False)
    assert abs(loss.item() - ref.item()) < 1e-6 * abs(ref.item())
    assert abs(metrics["loss/sft"] - ref_metrics["loss/sft"]) < 1e-6 * ref_metrics["loss/sft"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_micro_batch_without_scored_rows_is_a_zero_loss(backend):
    """hidden [0, H] (every response mask empty, no trace token): loss, metrics and zero gradients as the unfused
    path gives them (it was an IndexError from moving the empty log-probs into the batch's layout)."""
    hidden, weight, _, _, rows, batch = _problem(4, dtype=torch.float32)
    batch = _as_fp32_batch(batch)
    batch.response_mask = torch.zeros_like(batch.response_mask)
    batch.sft_components = torch.full_like(batch.sft_components, NONE)
    rows = {name: torch.full_like(index, -1) for name, index in rows.items()}
    hidden = hidden.detach()[:0].requires_grad_()
    config = PACTLossConfig(c_ent=0.01)
    targets = torch.zeros(0, dtype=torch.long)
    loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4, backend=backend)
    ref, ref_metrics = _unfused(hidden, weight, None, targets, rows, batch, config, 0.4, 1.0, False)
    loss.backward()
    assert loss.item() == ref.item() == 0.0 and metrics == ref_metrics
    assert hidden.grad.shape == (0, H) and weight.grad.abs().max() == 0


@pytest.mark.parametrize("logit_scale", [1.0, 3.0])
def test_bf16_shift_gradients_are_as_accurate_as_rounding_d_logits_once(logit_scale):
    """bf16, shift mode (no entropy bonus), one row block: dX, dW and db against float64 within 1.5x the error
    of the ordinary bf16 gradient of the same inputs (d logits formed in fp32 from the bf16 logits and rounded
    once to bf16, GEMMs with fp32 accumulation). The shift path rounds U, then beta * (U @ w) and beta * x;
    with round-to-nearest that costs 1.0-1.2x here. Rounding toward zero (the Triton interpreter's own fp32 ->
    bf16 cast) biased U and the row scaling the same way and cost 1.7-3x. One seed: the ratio of two rounding
    errors over a few hundred values (db) moves by tens of percent from seed to seed."""
    from pact_fast.kernels import fused_pact_head_launch as launch

    g = torch.Generator().manual_seed(12)
    N, H, Vb, T = 48, 32, 640, 0.8
    x = (logit_scale * torch.randn(N, H, generator=g)).bfloat16()
    w = (torch.randn(Vb, H, generator=g) / math.sqrt(H)).bfloat16()
    b = torch.randn(Vb, generator=g).bfloat16()
    t = torch.randint(0, Vb, (N,), generator=g)
    g_logp = torch.randn(N, generator=g)
    assert launch.shift_mode(torch.bfloat16, False)
    _, _, dx, dw, db = launch.run(x, w, b, t, 1 / T, False, lambda lo, hi, lp, en: (g_logp[lo:hi], None),
                                  rows_per_block=N)
    ref = [p.double().requires_grad_() for p in (x, w, b)]
    logp = torch.log_softmax((ref[0] @ ref[1].t() + ref[2]) / T, -1).gather(1, t[:, None]).squeeze(1)
    want = torch.autograd.grad((g_logp.double() * logp).sum(), ref)
    z = torch.addmm(b, x, w.t()).float() / T  # the workspace's bf16 logits
    dz = (g_logp[:, None] * (torch.nn.functional.one_hot(t, Vb) - torch.softmax(z, -1)) / T).bfloat16().float()
    ordinary = ((dz @ w.float()).bfloat16(), (dz.t() @ x.float()).bfloat16(), dz.sum(0).bfloat16())
    for name, got, base, ref_grad in zip(("x", "w", "b"), (dx, dw, db), ordinary, want):
        assert got.dtype == torch.bfloat16, name
        assert rel_err(got, ref_grad) <= 1.5 * rel_err(base, ref_grad), (name, rel_err(got, ref_grad),
                                                                          rel_err(base, ref_grad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_inputs_inside_a_bf16_autocast_region_stay_fp32_exact(backend):
    """A trainer's bf16 autocast region around the op ran the torch backend's fp32 GEMMs (logits, dX) in bf16:
    loss 2e-4 and gradients 3e-3 relative off float64 here. The op computes in its inputs' dtype whatever the
    region."""
    config = PACTLossConfig(c_ent=0.01)
    hidden, weight, bias, targets, rows, batch = _problem(3, dtype=torch.float32, bias=True, weight_scale=4.0)
    batch = _as_fp32_batch(batch)
    ref_loss, _ = _unfused(hidden, weight, bias, targets, rows, batch, config, 0.4, 1.0, False)
    ref = torch.autograd.grad(ref_loss, [hidden, weight, bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4, bias=bias, backend=backend)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    for name, g, r in zip(["hidden", "weight", "bias"], got, ref):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-4, name


def test_inside_torch_compile_the_op_runs_eagerly_and_equals_float64():
    """torch.compile (Inductor, CPU) around the op compiled its per-token constants wrong (the segment-mode SFT
    weights of reasoning tokens zeroed): loss 1.7 off, gradients 60% off, silently. It now runs eagerly there."""
    config = PACTLossConfig(c_ent=0.01)
    hidden, weight, bias, targets, rows, batch = _problem(3, bias=True)
    ref_loss, _ = _unfused(hidden, weight, bias, targets, rows, batch, config, 0.4, 1.0, False)
    ref = torch.autograd.grad(ref_loss, [hidden, weight, bias])
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, b: fused_pact_head(h, w, targets, rows, batch, config, 0.4, bias=b,
                                                             backend="torch")[0] * 2)
    loss = compiled(hidden, weight, bias)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    assert abs(loss.item() - 2 * ref_loss.item()) < 1e-12
    for name, g, r in zip(["hidden", "weight", "bias"], got, ref):
        assert rel_err(g, 2 * r) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_targets_under_a_vocabulary_past_their_range(dtype):
    """Targets held in uint8 / int8 under a vocabulary past that type's range (V = 300) were refused as outside
    [0, V) (V wrapped to 44 in the comparison); they are scored as their int64 values, and an id below 0 is still
    refused."""
    config = PACTLossConfig(c_ent=0.01)
    hidden, _, _, targets, rows, batch = _problem(3)
    weight = (torch.randn(300, H, generator=torch.Generator().manual_seed(1), dtype=D) / 3).requires_grad_()
    ids = targets + 70  # in [70, 107): each narrow dtype holds them, and each is past 300 wrapped to 44
    loss, _ = fused_pact_head(hidden, weight, ids.to(dtype), rows, batch, config, 0.4)
    ref, _ = fused_pact_head(hidden, weight, ids, rows, batch, config, 0.4)
    assert loss.item() == ref.item()
    if dtype != torch.uint8:
        with pytest.raises(RuntimeError, match="targets must lie in"):
            fused_pact_head(hidden, weight, (ids - 100).to(dtype), rows, batch, config, 0.4)


def test_a_backward_that_creates_a_graph_is_refused():
    """create_graph=True gave gradients that were constants of the inputs: a gradient penalty through the op
    silently lost its second-order term (the unfused path has one). It is refused in one line."""
    config = PACTLossConfig(c_ent=0.01)
    hidden, weight, _, targets, rows, batch = _problem(3)
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.4)
    with pytest.raises(RuntimeError, match="create_graph=True is refused"):
        torch.autograd.grad(loss, [hidden], create_graph=True)
    ref, _ = _unfused(hidden, weight, None, targets, rows, batch, config, 0.4, 1.0, False)
    g, = torch.autograd.grad(ref, [hidden], create_graph=True)
    assert g.requires_grad  # what the refused call would have silently dropped: the unfused one has a graph
