"""Benchmark of the per-token log-prob op: naive PyTorch vs the chunked torch path vs the Triton
kernels, plus Liger-Kernel's fused linear cross entropy and cut-cross-entropy where installed.

    python bench/bench_linear_logprobs.py                 # CPU: N=8192, H=1024, V=32000 (torch paths)
    python bench/bench_linear_logprobs.py --workload W-logprob --json out.json   # CUDA, SPEC section 6
    pytest bench/bench_linear_logprobs.py                 # pytest-benchmark, small size (pip install -e ".[bench]")
    python bench/bench_linear_logprobs.py --sass          # issue term of the forward epilogue (no GPU needed)

Every provider computes fp32 logp for N rows (and its gradient w.r.t. hidden and weight in
fwd+bwd mode, upstream gradient random). Times and peak extra memory are measured side by side
in one process; ratios are against the naive path.

``--sass`` compiles the forward epilogue at its GPU configuration for sm_90a and sm_80 as the compile gate does
(triton's bundled ptxas / cuobjdump), with the specialisation a launch gets (16-divisible pointers, strides and
sizes), and counts the SASS instructions of its column loop: warp-instructions per logit = instructions in the
loop body / logits one warp handles per iteration (BLOCK_R * BLOCK_S / num_warps).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, machine_info, measure, print_table, select_providers, write_json  # noqa: E402

from pact_fast.ops import linear_logprobs  # noqa: E402

WORKLOADS = {
    "cpu": dict(N=8192, H=1024, V=32000, dtype=torch.float32),
    "W-logprob": dict(N=32768, H=2048, V=151936, dtype=torch.bfloat16),
    "W-logprob-4096": dict(N=32768, H=4096, V=151936, dtype=torch.bfloat16),
    "tiny": dict(N=256, H=64, V=1000, dtype=torch.float32),
}


def providers(device):
    """name -> fn(hidden, weight, targets) returning fp32 logp [N]."""
    out = {
        "naive": lambda h, w, t: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, t[:, None]).squeeze(-1),
        "torch_chunked": lambda h, w, t: linear_logprobs(h, w, t, backend="torch"),
    }
    if device.type == "cuda":
        out["triton"] = lambda h, w, t: linear_logprobs(h, w, t, backend="triton")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out["liger_flce"] = lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none").float()
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()
        except ImportError:
            pass
    return out


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, targets


def run(workload, device, reps, names=None):
    shape = WORKLOADS[workload]
    hidden, weight, targets = make_inputs(**shape, device=device)
    grad = torch.randn(shape["N"], device=device)
    rows = []
    fns = providers(device)
    for name in select_providers(names, fns, "naive", device):
        fn = fns[name]

        def fwd():
            with torch.no_grad():
                fn(hidden, weight, targets)

        def fwd_bwd():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            (fn(h, w, targets) * grad).sum().backward()

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            seconds, peak = measure(call, device, reps=reps)
            rows.append({"provider": name, "mode": mode, "ms": seconds * 1e3, "peak_MiB": peak / 2 ** 20})
    for row in rows:
        base = next(r for r in rows if r["provider"] == "naive" and r["mode"] == row["mode"])
        row["time_vs_naive"] = row["ms"] / base["ms"]
        row["mem_vs_naive"] = row["peak_MiB"] / base["peak_MiB"] if base["peak_MiB"] else None
    return rows


def epilogue_sass_rows(archs=(90, 80), names=None):
    """One row per forward-epilogue gate entry (those in ``names``, default the 16-divisible vocabulary's builds)
    and architecture: registers, stack bytes, instructions in the column loop and warp-instructions per logit,
    compiled as the compile gate builds the entry (bench/sass.py)."""
    import sass

    from pact_fast.compile_gate import compile_entry
    from pact_fast.kernels import linear_logprobs_launch as launch
    from pact_fast.kernels.registry import odd_vocab

    rows = []
    for entry in (e for e in launch.gate_entries() if e.name.startswith("linear_logprobs.fwd")
                  and (e.name in names if names is not None else not odd_vocab(e.name))):
        for arch in archs:
            built = compile_entry(entry, arch)
            body, _ = sass.hot_loop(sass.kernel_sass(entry, arch))
            per_warp = entry.constexprs["BLOCK_R"] * entry.constexprs["BLOCK_S"] / entry.config.num_warps
            rows.append({"kernel": entry.name, "arch": f"sm_{arch}", "registers": built["registers"],
                         "stack": built["stack_bytes"], "loop_instructions": body,
                         "logits_per_warp_iteration": int(per_warp), "instructions_per_logit": body / per_warp})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--sass" in argv:  # its own report: every other option would go unread
        others = [a for a in argv if a != "--sass"]
        if others:
            raise SystemExit(f"bench_linear_logprobs.py: --sass prints the epilogue's SASS report and takes no other "
                             f"option (got {' '.join(others)})")
        print_table(epilogue_sass_rows(), ["kernel", "arch", "registers", "stack", "loop_instructions",
                                           "logits_per_warp_iteration", "instructions_per_logit"])
        return
    args, device, workload, reps = bench_args("linear log-prob benchmark", WORKLOADS, "W-logprob", "cpu", 10, 1, argv)
    rows = run(workload, device, reps, args.providers)
    shape = {k: str(v) for k, v in WORKLOADS[workload].items()}
    print(f"linear_logprobs  workload={workload} {shape}  device={device}")
    print_table(rows, ["provider", "mode", "ms", "peak_MiB", "time_vs_naive", "mem_vs_naive"])
    if args.json:
        write_json(args.json, {"bench": "linear_logprobs", "workload": workload, "shape": shape,
                               "machine": machine_info(device), "rows": rows})


def test_linear_logprobs_fwd_bwd(benchmark):
    """pytest-benchmark entry: the torch path at the tiny workload, forward+backward."""
    hidden, weight, targets = make_inputs(**WORKLOADS["tiny"], device="cpu")
    h = hidden.requires_grad_()

    def step():
        h.grad = None
        linear_logprobs(h, weight, targets, backend="torch").sum().backward()

    benchmark(step)
    assert h.grad is not None and torch.isfinite(h.grad).all()


if __name__ == "__main__":
    main()
