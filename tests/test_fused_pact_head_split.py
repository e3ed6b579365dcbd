"""The fused head's per-block kernels beside its GEMMs: the upstream-gradient kernel (one launch per row block in
place of ~64 torch ops) against ``loss_grads``' float64 formulas, and dX's GEMM split over the vocabulary (one
batched GEMM of partial products, summed by the scaling kernel) against float64 and against the unsplit GEMM."""
import math
import zlib

import pytest
import torch

from pact_fast import loss_grads
from pact_fast.kernels import fused_pact_head_launch as launch
from pact_fast.kernels.registry import interpreting
from pact_fast.losses import PACTLossConfig

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the Triton kernels under the interpreter")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _terms(n, g, kl):
    """Per-row constants of both surrogates: log-ratios spread over [-25, 25] (some past the +-20 clamp), rows
    whose denominator is their own log-prob (ratio exactly 1), both signs of advantage, a KL reference."""
    logp = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    den = logp - torch.empty(n, dtype=torch.float64).uniform_(-25, 25, generator=g)
    den[::5] = logp[::5]  # ratio exactly 1
    den[1::7] = logp[1::7] - 0.25  # ratio exp(0.25): outside [0.8, 1.2], clipped for a positive advantage
    po = (torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64), den,
          torch.rand(n, generator=g, dtype=torch.float64) if kl else None,
          logp + torch.randn(n, generator=g, dtype=torch.float64) if kl else None)
    tc = (torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64),
          logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))
    return logp, po, tc


@pytest.mark.parametrize("kl_estimator,kl_ratio_weighted", [(None, False), ("k1", True), ("k2", False),
                                                             ("k2", True), ("k3", False), ("k3", True)])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_row_grads_kernel_equals_the_float64_formulas(kl_estimator, kl_ratio_weighted, dual_clip):
    g = torch.Generator().manual_seed(zlib.crc32(repr((kl_estimator, kl_ratio_weighted, dual_clip)).encode()))
    n = 203
    config = PACTLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip,
                            kl_estimator=kl_estimator or "k3", kl_ratio_weighted=kl_ratio_weighted,
                            beta_kl=0.1 if kl_estimator else 0.0)
    logp, po, tc = _terms(n, g, kl_estimator is not None)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    want = (base + loss_grads.SurrogateTerm(*po[:3], config, *po[3:]).grad(logp)
            + loss_grads.SurrogateTerm(*tc, config).grad(logp))
    f32 = [t.float() if t is not None else None for t in (logp, base, *po, *tc)]
    got = launch.row_grads(f32[0], f32[1], tuple(f32[2:7]), tuple(f32[7:]), clip_eps_low=0.2, clip_eps_high=0.28,
                           dual_clip=dual_clip, kl_estimator=kl_estimator or "k3",
                           kl_ratio_weighted=kl_ratio_weighted)
    assert got.dtype == torch.float32 and got.shape == (n,)
    # fp32 inputs against float64 formulas on the same rounded values: the rows clipped to 0 agree exactly
    want32 = (f32[1].double() + loss_grads.SurrogateTerm(*[t.double() if t is not None else None
                                                           for t in f32[2:5]], config,
                                                         *[t.double() if t is not None else None
                                                           for t in f32[5:7]]).grad(f32[0].double())
              + loss_grads.SurrogateTerm(*[t.double() for t in f32[7:]], config).grad(f32[0].double()))
    # each row within fp32 rounding of the magnitudes it sums (log-ratios rounded to fp32 move exp by ~1e-6 of it;
    # the ratio-weighted KL adds terms up to ~e^20 that cancel)
    lp, ratio = f32[0].double(), (f32[0].double() - f32[4].double()).clamp(-20, 20).exp()
    magnitude = f32[1].double().abs() + (f32[2].double() * f32[3].double() * ratio).abs() + \
        (f32[7].double() * f32[8].double()).abs() * (lp - f32[9].double()).clamp(-20, 20).exp()
    if kl_estimator:
        log_ratio = lp - f32[6].double()
        kl_scale = f32[5].double() * (ratio if kl_ratio_weighted else 1.0)
        magnitude += kl_scale * (log_ratio.abs() + (-log_ratio).clamp(max=20).exp() + 1) * (2 if kl_ratio_weighted else 1)
    assert ((got.double() - want32).abs() <= 4e-6 * magnitude + 1e-7).all(), (got.double() - want32).abs().max()
    assert rel_err(got, want) < 1e-5
    surrogate = loss_grads.SurrogateTerm(*po[:3], config).grad(logp)  # the cases the inputs reach:
    assert (surrogate == 0).any() and (surrogate != 0).any()  # rows clipped or past the clamp, rows with a gradient


def test_row_grads_kernel_without_terms_and_without_denominators():
    g = torch.Generator().manual_seed(1)
    n = 37
    logp = -torch.rand(n, generator=g)
    base = torch.randn(n, generator=g)
    assert torch.equal(launch.row_grads(logp, base), base)
    assert torch.equal(launch.row_grads(logp), torch.zeros(n))
    config = PACTLossConfig()
    w, adv = torch.rand(n, generator=g), torch.randn(n, generator=g)
    # no denominator: the ratio is 1, inside the clip range: d loss / d logp = -weight * adv
    got = launch.row_grads(logp, None, (w, adv, None, None, None), None)
    want = loss_grads.SurrogateTerm(w.double(), adv.double(), None, config).grad(logp.double())
    assert torch.allclose(got.double(), want, rtol=1e-6) and torch.allclose(got, -w * adv, rtol=1e-6)
    assert launch.row_grads(logp[:0]).shape == (0,)


def test_dx_splits_fill_whole_waves_of_tiles():
    # W-logprob at H=2048: 384-row blocks are 3 x 8 tiles of 128x256. Split S ways, dX's GEMM takes
    # ceil(24 S / 132) waves of tiles reducing over V / S columns: 11 splits fill two waves exactly, the least
    # time per column of any S up to the bound (written out here: waves / S)
    R, H, V = 384, 2048, 151936
    per_split = {S: math.ceil(24 * S / 132) / S for S in range(1, launch.MAX_DX_SPLITS + 1)}
    assert min(per_split, key=per_split.get) == 11 == launch.dx_splits(R, H, V)
    # 448 rows (4 x 8 tiles): four splits make 128 tiles, one wave; a bound on the workspace is obeyed
    assert launch.dx_splits(448, H, V) == 4 and launch.dx_splits(R, H, V, fits=lambda S: S <= 6) == 5
    # a block that fills a wave by itself, or a short vocabulary, is not split
    assert launch.dx_splits(1024, 4096, 151936) == 1
    assert launch.dx_splits(64, 256, 2 * launch.MIN_SPLIT_K - 1) == 1
    k, rem = launch.split_columns(V, 11)
    assert k % launch.SPLIT_ALIGN == 0 and 11 * k + rem == V and rem < 11 * launch.SPLIT_ALIGN


def _problem(N, V, H, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return x, w, b, t, torch.randn(N, generator=g), torch.randn(N, generator=g)


def _float64_grads(x, w, b, t, g_logp, g_ent, inv_temp, want_entropy):
    ref = [p.double().requires_grad_() for p in (x, w)]
    z = ref[0] @ ref[1].t() + (b.double() if b is not None else 0)
    logp = torch.log_softmax(z * inv_temp, -1)
    out = (g_logp.double() * logp.gather(1, t[:, None]).squeeze(1)).sum()
    if want_entropy:
        out = out + (g_ent.double() * -(logp.exp() * logp).sum(-1)).sum()
    return torch.autograd.grad(out, ref)


@pytest.mark.parametrize("dtype,want_entropy,bias", [(torch.float32, False, True), (torch.bfloat16, False, False),
                                                     (torch.float32, True, False), (torch.float16, False, True)],
                         ids=["fp32-shift", "bf16-shift", "fp32-ordinary", "fp16-ordinary"])
@pytest.mark.parametrize("V", [96, 203], ids=["V96-even", "V203-remainder"])
def test_split_dx_equals_float64_and_the_unsplit_gemm(dtype, want_entropy, bias, V):
    N, H, R = 29, 24, 11  # ragged row blocks
    x, w, b, t, g_logp, g_ent = _problem(N, V, H, dtype, V + N, bias)

    def grads(lo, hi, logp, ent):
        return g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None

    split = launch.run(x, w, b, t, 1 / 0.9, want_entropy, grads, rows_per_block=R, splits=3)
    whole = launch.run(x, w, b, t, 1 / 0.9, want_entropy, grads, rows_per_block=R, splits=1)
    want_dx, want_dw = _float64_grads(x, w, b, t, g_logp, g_ent, 1 / 0.9, want_entropy)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert split[2].dtype == dtype
    assert rel_err(split[2], want_dx) < tol and rel_err(split[3], want_dw) < tol
    # the unsplit GEMM rounds its sum once; the split one rounds each partial product: no worse by more than 1.5x
    assert rel_err(split[2], want_dx) <= 1.5 * rel_err(whole[2], want_dx) + 1e-7
    assert torch.equal(split[3], whole[3]) and torch.equal(split[0], whole[0])  # dW and log-probs untouched


def test_zero_rows_and_the_split_options_that_do_not_apply():
    x, w, b, t, g_logp, _ = _problem(0, 96, 24, torch.float32, 1, True)
    logp, ent, dx, dw, db = launch.run(x, w, b, t, 1.0, False, lambda lo, hi, lp, en: (g_logp[lo:hi], None))
    assert logp.shape == (0,) and dx.shape == (0, 24)  # no rows: dW and db are zeros, never left unwritten
    assert dw.shape == (96, 24) and (dw == 0).all() and db.shape == (96,) and (db == 0).all()
    assert launch.extra_memory_bytes(0, 96, 24, torch.float32) == 0
    x, w, b, t, g_logp, _ = _problem(8, 96, 24, torch.float32, 2, False)
    with pytest.raises(ValueError, match="memory_lean"):
        launch.run(x, w, b, t, 1.0, False, lambda lo, hi, lp, en: (g_logp[lo:hi], None), memory_lean=True,
                   splits=2)
