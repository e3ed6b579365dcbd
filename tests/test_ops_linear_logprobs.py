import importlib
import pytest
import torch

from pact_fast.ops import linear_logprobs, linear_logprobs_reference
from pact_fast.ops._backend import resolve_backend
from conftest import rel_err

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CASES = [
    pytest.param(37, 48, 203, id="N37-H48-V203"),
    pytest.param(16, 32, 64, id="N16-H32-V64"),
    pytest.param(5, 24, 1001, id="N5-H24-V1001"),
]


def _inputs(N, H, V, dtype, device, scale=1.0, n_ignored=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    bias = torch.randn(V, generator=g).to(dtype).to(device)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, bias, targets.to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("N,H,V", CASES)
def test_matches_float64_reference(backend, dtype, use_bias, temperature, N, H, V, device):
    hidden, weight, bias, targets = _inputs(N, H, V, dtype, device)
    bias = bias if use_bias else None
    inputs = [hidden, weight] + ([bias] if use_bias else [])
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().clone().requires_grad_() for t in inputs]
    logp, ent = linear_logprobs(ours[0], ours[1], targets, bias=ours[2] if use_bias else None,
                                temperature=temperature, return_entropy=True, backend=backend)
    logp_r, ent_r = linear_logprobs_reference(ref[0], ref[1], targets, bias=ref[2] if use_bias else None,
                                              temperature=temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert rel_err(logp, logp_r) < TOL[dtype]
    assert rel_err(ent, ent_r) < TOL[dtype]
    g_logp = torch.randn(N, device=device)
    g_ent = torch.randn(N, device=device)
    (logp * g_logp + ent * g_ent).sum().backward()
    (logp_r * g_logp.double() + ent_r * g_ent.double()).sum().backward()
    for name, o, r in zip(["hidden", "weight", "bias"], ours, ref):
        assert o.grad.dtype == dtype
        assert rel_err(o.grad, r.grad) < TOL[dtype], name


def _check_against_float64(hidden, weight, bias, targets, tol, temperature=1.0, transform=None, **kwargs):
    """Our logp, entropy and every gradient (random g_logp and g_ent) against the float64 reference;
    ``transform``: logit_scale / softcap keywords given to both."""
    transform = transform or {}
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().clone().requires_grad_() for t in inputs]
    logp, ent = linear_logprobs(ours[0], ours[1], targets, bias=ours[2] if bias is not None else None,
                                temperature=temperature, return_entropy=True, **transform, **kwargs)
    logp_r, ent_r = linear_logprobs_reference(ref[0], ref[1], targets, bias=ref[2] if bias is not None else None,
                                              temperature=temperature, **transform)
    assert (logp <= 0).all() and (ent >= 0).all()
    assert rel_err(logp, logp_r) < tol and rel_err(ent, ent_r) < tol
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(targets.shape, generator=g).to(hidden.device)
    g_ent = torch.randn(targets.shape, generator=g).to(hidden.device)
    (logp * g_logp + ent * g_ent).sum().backward()
    (logp_r * g_logp.double() + ent_r * g_ent.double()).sum().backward()
    for name, o, r in zip(["hidden", "weight", "bias"], ours, ref):
        assert o.grad.dtype == o.dtype
        assert rel_err(o.grad, r.grad) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows,slab", [(8, 40), (16, 128), (13, 999)], ids=["R8-S40", "R16-S128", "R13-S999"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_triton_row_blocks_and_vocab_slabs_match_float64(dtype, rows, slab, use_bias, device):
    """Several ragged row blocks x vocabulary slabs (last ones partial), ignored rows, temperature."""
    hidden, weight, bias, targets = _inputs(45, 40, 301, dtype, device, n_ignored=4, seed=3)
    _check_against_float64(hidden, weight, bias if use_bias else None, targets, TOL[dtype], temperature=0.8,
                           backend="triton", chunk_rows=rows, vocab_slab=slab)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_across_slabs(backend, device):
    """|logits| ~ 1e3 with the maximum in a later slab than the target: the online LSE rescales exactly."""
    hidden, weight, _, targets = _inputs(23, 16, 157, torch.float32, device, n_ignored=0, seed=5)
    weight = weight * (1e3 / (hidden @ weight.t()).abs().max())
    _check_against_float64(hidden, weight, None, targets, 2e-5, backend=backend, chunk_rows=5,
                           **({"vocab_slab": 32} if backend == "triton" else {}))


TRANSFORMS = [
    pytest.param(dict(softcap=3.0), id="softcap3"),
    pytest.param(dict(logit_scale=0.37), id="scale0.37"),
    pytest.param(dict(logit_scale=2.5, softcap=4.0), id="scale2.5-softcap4"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_logit_scale_and_softcap_match_float64(backend, dtype, transform, device):
    """Gemma2 / Granite / Cohere logit transforms (with a bias, temperature 0.8, ignored rows, V odd): logp,
    entropy and the gradients of hidden, weight and bias against float64 autograd of the reference; the triton
    backend over ragged row blocks x vocabulary slabs. Logits reach ~8, so the cap of 3 saturates."""
    hidden, weight, bias, targets = _inputs(37, 48, 203, dtype, device, scale=3.0, n_ignored=4, seed=11)
    blocking = dict(chunk_rows=13, vocab_slab=40) if backend == "triton" else dict(chunk_rows=16)
    _check_against_float64(hidden, weight, bias, targets, TOL[dtype], temperature=0.8, transform=transform,
                           backend=backend, **blocking)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_on_large_logits_across_slabs(backend, device):
    """|logit_scale * logits| ~ 1e3, capped at 30 (Gemma2's value): deep in tanh's saturation, where the
    derivative 1 - tanh^2 must not cancel, with the maximum in a later slab than the target."""
    hidden, weight, bias, targets = _inputs(23, 16, 157, torch.float32, device, n_ignored=2, seed=5)
    weight = weight * (2e3 / (hidden @ weight.t()).abs().max())
    _check_against_float64(hidden, weight, bias, targets, 2e-5, transform=dict(logit_scale=0.5, softcap=30.0),
                           backend=backend, chunk_rows=5, **({"vocab_slab": 32} if backend == "triton" else {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logit_scale_without_softcap_is_an_inverse_temperature(backend, device):
    """logit_scale s with softcap=None folds into the temperature: the same values and gradients as
    temperature 1 / s (bit for bit at s = 4, a power of two; to rounding at s = 0.3)."""
    hidden, weight, bias, targets = _inputs(21, 32, 77, torch.float32, device, seed=2)
    for scale, exact in ((4.0, True), (0.3, False)):
        results = []
        for kwargs in (dict(logit_scale=scale), dict(temperature=1.0 / scale)):
            h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
            logp, ent = linear_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend, **kwargs)
            (logp.sum() + 0.5 * ent.sum()).backward()
            results.append((logp, ent, h.grad, w.grad, b.grad))
        for got, want in zip(*results):
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_triton_gradients_come_back_in_the_input_dtype_without_fp32_copies(device):
    hidden, weight, _, targets = _inputs(20, 32, 90, torch.float16, device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, targets, backend="triton", chunk_rows=8, vocab_slab=32)
    logp.sum().backward()
    assert h.grad.dtype == torch.float16 and w.grad.dtype == torch.float16
    ignored = targets == -100
    assert torch.all(h.grad[ignored] == 0) and torch.all(h.grad[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_are_zero_and_get_no_gradient(backend, device):
    hidden, weight, _, targets = _inputs(21, 32, 77, torch.float32, device, n_ignored=5)
    hidden.requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(logp[~ignored] < 0)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[ignored] == 0)
    assert torch.all(hidden.grad[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_stay_finite_and_nonpositive(backend, device):
    # logits of magnitude ~1e3
    hidden, weight, _, targets = _inputs(19, 16, 131, torch.float32, device, scale=1.0, n_ignored=0)
    weight = weight * (1e3 / (hidden @ weight.t()).abs().max())
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    logp_r, ent_r = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    assert rel_err(logp, logp_r) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_only_gradient(backend, device):
    hidden, weight, _, targets = _inputs(9, 16, 50, torch.float32, device)
    h = hidden.clone().requires_grad_()
    h_r = hidden.double().clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, targets, return_entropy=True, backend=backend)
    ent.sum().backward()
    linear_logprobs_reference(h_r, weight.double(), targets)[1].sum().backward()
    assert rel_err(h.grad, h_r.grad) < 2e-5


def test_chunking_does_not_change_results():
    hidden, weight, _, targets = _inputs(40, 16, 97, torch.float32, "cpu")
    whole = linear_logprobs(hidden, weight, targets, backend="torch", chunk_rows=1000)
    chunked = linear_logprobs(hidden, weight, targets, backend="torch", chunk_rows=7)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_torch_chunks_are_sized_by_budget_and_minimum_rows():
    import importlib

    mod = importlib.import_module("pact_fast.ops.linear_logprobs")

    assert mod._torch_chunk_rows(32000) >= mod._MIN_CHUNK_ROWS  # 2M-element chunks were 65 rows here
    assert mod._torch_chunk_rows(151936) == mod._MIN_CHUNK_ROWS
    assert mod._torch_chunk_rows(1000) * 1000 * 4 <= mod._CHUNK_BYTES < (mod._torch_chunk_rows(1000) + 1) * 4000



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap20"])
def test_torch_16bit_logits_are_not_rounded_to_16_bits(dtype, use_bias, softcap, monkeypatch):
    """A bf16 / fp16 lm_head on the torch path (a CPU LoRA run with ``model.lora.base_dtype=bfloat16``): logits
    ~10 multiplied in fp32 over vocabulary slabs (20 columns here: several slabs, the last partial), so logp and
    entropy are as exact as fp32 logits of the same 16-bit inputs, and each gradient within 16-bit rounding of the
    float64 reference (it was the logits rounded to bf16 first: logp off by ~0.02 nats, ~1e-3 relative)."""
    mod = importlib.import_module("pact_fast.ops.linear_logprobs")

    N, H, V = 41, 32, 203
    monkeypatch.setattr(mod, "_UPCAST_SLAB_BYTES", 20 * 4 * H, raising=False)  # slabs of 20 columns (9 for 6 rows)
    monkeypatch.setattr(mod, "_MIN_UPCAST_SLAB", 1, raising=False)
    hidden, weight, bias, targets = _inputs(N, H, V, dtype, "cpu", scale=12.0, n_ignored=3, seed=7)
    bias = bias if use_bias else None
    inputs = [hidden, weight] + ([bias] if use_bias else [])
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().clone().requires_grad_() for t in inputs]
    logp, ent = linear_logprobs(ours[0], ours[1], targets, bias=ours[2] if use_bias else None, softcap=softcap,
                                return_entropy=True, backend="torch", chunk_rows=16)
    logp_r, ent_r = linear_logprobs_reference(ref[0], ref[1], targets, bias=ref[2] if use_bias else None,
                                              softcap=softcap)
    assert logp_r.abs().max() > 5  # logits large enough for 16-bit rounding to show
    assert rel_err(logp, logp_r) < 1e-5 and rel_err(ent, ent_r) < 1e-5
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    (logp * g_logp + ent * g_ent).sum().backward()
    (logp_r * g_logp.double() + ent_r * g_ent.double()).sum().backward()
    for name, o, r in zip(["hidden", "weight", "bias"], ours, ref):
        assert o.grad.dtype == dtype
        rounding = rel_err(r.grad.to(dtype), r.grad)  # the float64 gradient rounded once to the input dtype
        assert rel_err(o.grad, r.grad) < 2 * rounding, name
    assert mod.upcast_slab_cols(V, H, 16) == 20  # several slabs were taken, the last partial



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_without_ignored_rows(backend, device):
    """Every row kept (no compaction copy): strided hidden and targets must still be read right."""
    hidden, weight, _, targets = _inputs(30, 16, 70, torch.float32, device, n_ignored=0)
    logp = linear_logprobs(hidden[::2], weight, targets[::2], backend=backend)
    logp_r, _ = linear_logprobs_reference(hidden[::2].double(), weight.double(), targets[::2])
    assert rel_err(logp, logp_r) < 2e-5


def test_leading_dims_are_kept():
    hidden, weight, _, targets = _inputs(24, 16, 40, torch.float32, "cpu")
    flat = linear_logprobs(hidden, weight, targets)
    shaped = linear_logprobs(hidden.view(2, 3, 4, 16), weight, targets.view(2, 3, 4))
    assert shaped.shape == (2, 3, 4)
    assert torch.equal(shaped.reshape(-1), flat)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(6)), TypeError, "targets"),
    (dict(targets=torch.full((6,), 40)), ValueError, "outside"),
    (dict(targets=torch.full((6,), -3)), ValueError, "outside"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=-2.0), ValueError, "logit_scale"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-30.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(weight=torch.randn(40, 8)), ValueError, "hidden"),
    (dict(hidden=torch.randn(6, 0), weight=torch.randn(40, 0)), ValueError, r"V >= 1 and H >= 1, got shape \(40, 0\)"),
    (dict(weight=torch.randn(0, 16), targets=torch.full((6,), -100)), ValueError, "V >= 1 and H >= 1"),
    (dict(weight=torch.randn(40, 16, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.randn(39)), ValueError, "bias"),
    (dict(weight=torch.randn(40, 16, device="meta")), ValueError, "devices"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(vocab_slab=-4), ValueError, "vocab_slab"),
    (dict(chunk_rows=True), ValueError, "chunk_rows"),  # a bool is an int to Python: it was chunks of one row
    (dict(ignore_index=None), TypeError, "ignore_index` must be an int"),
    (dict(ignore_index=True), TypeError, "ignore_index` must be an int"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index` must be an int"),
    (dict(ignore_index=2 ** 63), TypeError, "ignore_index` must be an int"),  # was torch's "expected 'int', found 'int'"
], ids=["targets-shape", "targets-float", "target-too-big", "target-negative", "temp-zero", "temp-negative",
        "scale-zero", "scale-negative", "scale-inf", "scale-nan", "softcap-zero", "softcap-negative", "softcap-inf",
        "hidden-H", "H-zero", "V-zero", "weight-dtype", "bias-shape", "devices", "backend-name", "chunk-rows", "vocab-slab",
        "chunk-rows-bool", "ignore-none", "ignore-bool", "ignore-float", "ignore-past-int64"])
def test_bad_input_is_a_clear_error(kwargs, exc, word):
    args = dict(hidden=torch.randn(6, 16), weight=torch.randn(40, 16), targets=torch.zeros(6, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=word):
        linear_logprobs(hidden, weight, targets, **args)


def _float64_leaves(N, H, V, seed):
    """float64 hidden [N, H], weight [V, H] and bias [V] that require grad, and targets [N] in [0, V)."""
    torch.manual_seed(seed)
    hidden, weight = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    bias = torch.randn(V, dtype=torch.float64)
    return hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), torch.randint(0, V, (N,))


@pytest.mark.parametrize("transform", [{}, dict(logit_scale=0.6, softcap=2.0)], ids=["plain", "scale-softcap"])
def test_the_op_compiles_in_one_graph_and_matches_eager(transform):
    """``linear_logprobs`` is a registered custom op (fake implementation and autograd formula):
    ``torch.compile(fullgraph=True)`` of a function around it compiles on CPU (no graph break) and gives eager's
    values and gradients, ignored rows included, with and without a logit scale and soft cap."""
    N, H, V = 37, 16, 101
    hidden, weight, bias, targets = _float64_leaves(N, H, V, seed=0)
    targets[::5] = -100

    def loss(hidden, weight, bias, targets):
        logp, ent = linear_logprobs(torch.tanh(hidden), weight, targets, bias=bias, temperature=0.7,
                                    return_entropy=True, backend="torch", **transform)
        return (logp * torch.arange(N)).sum() + 0.3 * ent.sum()  # float64 outputs of float64 inputs

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))
    want = loss(hidden, weight, bias, targets)
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    assert hasattr(torch.ops.pact_fast, "linear_logprobs")


@pytest.mark.parametrize("transform", [{}, dict(logit_scale=0.6, softcap=2.0)], ids=["plain", "scale-softcap"])
def test_float64_inputs_give_float64_log_probs_that_pass_gradcheck(transform):
    """The torch backend computes in float64 for float64 inputs (it returned fp32, ~1e-6 off, before): log-probs
    and entropies equal the float64 reference to 1e-12, and ``torch.autograd.gradcheck`` passes through the op,
    an ignored row and a chunk boundary included. The triton backend refuses float64 in one line."""
    N, H, V = 7, 5, 11
    hidden, weight, bias, targets = _float64_leaves(N, H, V, seed=3)
    targets[2] = -100
    kw = dict(bias=bias, temperature=0.7, **transform)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="torch", chunk_rows=4, **kw)
    ref_logp, ref_ent = linear_logprobs_reference(hidden, weight, targets, **kw)
    assert logp.dtype == ent.dtype == torch.float64
    assert (logp - ref_logp).abs().max() < 1e-12
    assert ((ent - ref_ent)[targets != -100]).abs().max() < 1e-12

    def f(hidden, weight, bias):
        lp, en = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="torch", chunk_rows=4,
                                 **{**kw, "bias": bias})
        return lp, en

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 inputs, got torch.float64"):
        linear_logprobs(hidden, weight, targets, backend="triton")
    # "auto" on a GPU picks the torch backend for float64 (the kernels take 16- and 32-bit floats)
    cuda = torch.device("cuda")
    assert resolve_backend("op", "auto", cuda, ("auto", "torch", "triton"), "torch", torch.float64) == "torch"
    assert resolve_backend("op", "auto", cuda, ("auto", "torch", "triton"), "torch", torch.bfloat16) == "triton"


@pytest.mark.parametrize("cap", [0.0, 2.5], ids=["nocap", "cap2.5"])
def test_the_op_passes_torch_library_opcheck(cap):
    """Schema, fake implementation and autograd registration agree with the op (``torch.library.opcheck``);
    its float arguments are the folded inverse temperature and soft cap (0.0: none)."""
    torch.manual_seed(1)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(33, 8, requires_grad=True)
    targets = torch.randint(0, 33, (9,))
    targets[2] = -100
    torch.library.opcheck(torch.ops.pact_fast.linear_logprobs.default,
                          (hidden, weight, None, targets, 1.0, cap, -100, "torch", 0, 0))


def test_a_numpy_or_tensor_temperature_is_a_number_and_infinity_is_refused():
    """np.float32(0.5) and torch.tensor(0.5) were refused as "not a number"; inf was accepted (uniform logits)."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 11, (4,), generator=g)
    ref = linear_logprobs(h, w, t, temperature=0.5, backend="torch")
    for temperature in (np.float32(0.5), torch.tensor(0.5)):
        assert torch.equal(linear_logprobs(h, w, t, temperature=temperature, backend="torch"), ref)
    for bad in (float("inf"), True, torch.tensor([0.5, 0.5])):
        with pytest.raises(ValueError, match="temperature` must be a finite number > 0"):
            linear_logprobs(h, w, t, temperature=bad, backend="torch")
    # a learnable temperature was read as a number (a float() warning) and got no gradient
    with pytest.raises(ValueError, match="`temperature` is a tensor that requires grad; the op takes it as a constant"):
        linear_logprobs(h, w, t, temperature=torch.tensor(0.5, requires_grad=True), backend="torch")


def test_ignore_index_of_numpy_or_a_tensor_is_the_int():
    """A numpy or 0-dim tensor ignore_index is its integer value (the check that refuses None keeps them)."""
    import numpy as np

    hidden, weight = torch.randn(6, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    targets = torch.tensor([3, 7, 7, 0, 39, 7])
    want = linear_logprobs(hidden, weight, targets, ignore_index=7)
    assert (want[targets == 7] == 0).all() and (want[targets != 7] != 0).all()
    for value in (np.int64(7), torch.tensor(7)):
        torch.testing.assert_close(linear_logprobs(hidden, weight, targets, ignore_index=value), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
def test_fp32_inputs_inside_a_bf16_autocast_region_stay_fp32_exact(backend, backward_inside):
    """A trainer's bf16 autocast region around the op ran the torch path's fp32 GEMMs in bf16: log-probs from
    bf16-rounded logits (0.09 nats off here), and backward, run after the region, took fp32 logits against
    forward's bf16 log-sum-exp (dX 4% off). The op computes in its inputs' dtype whatever the region."""
    hidden, weight, bias, targets = _inputs(16, 32, 50, torch.float32, "cpu", scale=4.0)
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(16, generator=g), torch.randn(16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = linear_logprobs(*ours[:2], targets, bias=ours[2], return_entropy=True, backend=backend)
        loss = (logp * g_logp + ent * g_ent).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    logp_r, ent_r = linear_logprobs_reference(*ref[:2], targets, bias=ref[2])
    (logp_r * g_logp.double() + ent_r * g_ent.double()).sum().backward()
    assert logp.dtype == torch.float32
    assert rel_err(logp, logp_r) < TOL[torch.float32] and rel_err(ent, ent_r) < TOL[torch.float32]
    for name, o, r in zip(["hidden", "weight", "bias"], ours, ref):
        assert rel_err(o.grad, r.grad) < TOL[torch.float32], name
