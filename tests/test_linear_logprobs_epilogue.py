"""The forward epilogue at its GPU tiles (4 rows x 1024 columns held as 4 chunks per thread), run under the
Triton interpreter: full tiles, a masked tail tile per slab and several slabs per row block give the float64
reference's logp, lse and entropy, with and without a soft cap, targets in every slab."""
import pytest
import torch

from pact_fast.kernels import linear_logprobs_launch as launch
from pact_fast.kernels.registry import interpreting
from pact_fast.ops.linear_logprobs import linear_logprobs_reference, logit_transform
from conftest import rel_err

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the GPU tiles on the Triton interpreter")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transform", [dict(temperature=0.8), dict(logit_scale=1.5, softcap=3.0)],
                         ids=["T0.8", "scale-softcap"])
def test_gpu_tiles_match_float64(dtype, tol, transform):
    g = torch.Generator().manual_seed(5)
    N, H, V = 7, 16, 2600  # slabs of 1100 columns: one full 1024-column tile and a 76-column tail, then 400
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    t = torch.tensor([0, 1023, 1024, 1099, 1100, 2199, 2599])  # first / last columns of tiles and slabs
    inv_temp, cap = logit_transform(transform.get("temperature", 1.0), transform.get("logit_scale", 1.0),
                                    transform.get("softcap"))
    logp, lse, ent = launch.forward(x, w, None, t, inv_temp, configs=launch.GPU_CONFIGS,
                                    blocking=launch.Blocking(5, 1100), cap=cap or None)
    logp_r, ent_r = linear_logprobs_reference(x.double(), w.double(), t, **transform)
    assert rel_err(logp, logp_r) < tol and rel_err(ent, ent_r) < tol
    assert (logp <= 0).all() and (ent >= 0).all()
    z = (x.double() @ w.double().t()) * transform.get("logit_scale", 1.0)
    if "softcap" in transform:
        z = transform["softcap"] * torch.tanh(z / transform["softcap"])
    assert rel_err(lse, torch.logsumexp(z / transform.get("temperature", 1.0), -1)) < tol
