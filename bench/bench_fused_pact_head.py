"""Benchmark of the PACT loss head: fused (``fused_pact_head``) vs unfused (``linear_logprobs`` + ``pact_loss``)
vs naive (materialised logits + log_softmax + ``pact_loss``), forward+backward, same inputs, one process.

    python bench/bench_fused_pact_head.py                  # CPU: N=8192, H=1024, V=32000, fp32
    python bench/bench_fused_pact_head.py --workload tiny  # seconds
    python bench/bench_fused_pact_head.py                  # CUDA: W-logprob rows (N=32768, H=2048, V=151936, bf16)

The N scored rows are laid out as a PACT micro-batch: B rollouts x T tokens under both contexts plus
S traces x E tokens. Every provider returns the same loss; ratios are against naive. ``fused`` is the
torch backend; ``fused_triton`` (the Triton backend) runs only on CUDA and is listed as skipped elsewhere.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, machine_info, measure, print_table, select_providers, write_json  # noqa: E402

from pact_fast.losses import OTHER, REASONING, TOOL_CALL, PACTBatch, PACTLossConfig, pact_loss  # noqa: E402
from pact_fast.ops import linear_logprobs  # noqa: E402
from pact_fast.ops.fused_pact_head import fused_pact_head  # noqa: E402

WORKLOADS = {
    # 16 rollouts x 200 tokens in two contexts (6,400 rows) + 2 traces x 896 tokens (1,792 rows) = 8,192 rows
    "cpu": dict(B=16, T=200, S=2, E=896, H=1024, V=32000, dtype=torch.float32),
    "tiny": dict(B=4, T=16, S=1, E=32, H=64, V=1000, dtype=torch.float32),
    # 64 rollouts x 224 tokens in two contexts (28,672 rows) + 4 traces x 1,024 tokens = 32,768 rows
    "W-logprob": dict(B=64, T=224, S=4, E=1024, H=2048, V=151936, dtype=torch.bfloat16),
}


def make_inputs(B, T, S, E, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * B * T + S * E
    rows = {"logp_po": torch.arange(B * T).view(B, T), "logp_tc": torch.arange(B * T, 2 * B * T).view(B, T),
            "sft_logp": torch.arange(2 * B * T, n).view(S, E)}
    comps = torch.tensor([REASONING, TOOL_CALL, OTHER])[torch.randint(0, 3, (S, E), generator=g)]
    batch = PACTBatch(response_mask=torch.ones(B, T), rewards=torch.rand(B, generator=g),
                      group_ids=torch.arange(B) // 4, old_logp_tc=-torch.rand(B, T, generator=g) * 3 - 8,
                      old_logp_po=-torch.rand(B, T, generator=g) * 3 - 8, sft_components=comps,
                      sft_segment_ids=torch.zeros(S, E, dtype=torch.long), sft_turn_ids=torch.zeros(S, E, dtype=torch.long))
    batch = PACTBatch(**{f: (v.to(device) if isinstance(v, torch.Tensor) else v) for f, v in vars(batch).items()})
    hidden = torch.randn(n, H, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g).to(device)
    return hidden, weight, targets, {k: v.to(device) for k, v in rows.items()}, batch


def _with(batch, rows, logp):
    fill = {name: logp[index] for name, index in rows.items()}
    return PACTBatch(**{**vars(batch), **fill})


def providers(hidden, weight, targets, rows, batch, config):
    """(name -> fn() returning the loss, differentiable w.r.t. hidden and weight; name -> why it is skipped)."""
    def naive():
        logp = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)
        return pact_loss(_with(batch, rows, logp), config, 0.3)[0]

    def unfused():
        logp = linear_logprobs(hidden, weight, targets, backend="torch")
        return pact_loss(_with(batch, rows, logp), config, 0.3)[0]

    def fused():
        return fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, backend="torch")[0]

    def fused_lean():
        return fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, memory_lean=True, backend="torch")[0]

    def fused_triton():
        return fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, backend="triton")[0]

    def fused_triton_lean():
        return fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, memory_lean=True,
                               backend="triton")[0]

    run = {"naive": naive, "unfused": unfused, "fused": fused, "fused_lean": fused_lean}
    skipped = {}
    for name, fn in (("fused_triton", fused_triton), ("fused_triton_lean", fused_triton_lean)):
        if hidden.device.type == "cuda":
            run[name] = fn
        else:
            skipped[name] = "the Triton backend needs CUDA (the interpreter is for tests, not timing)"
    return run, skipped


def run(workload, device, reps, names=None):
    w = WORKLOADS[workload]
    hidden, weight, targets, rows, batch = make_inputs(**w, device=device)
    config = PACTLossConfig()
    out = []
    losses = {}
    fns, skipped = providers(hidden, weight, targets, rows, batch, config)
    for name, why in skipped.items():
        if not names or name in names:
            print(f"skipped {name}: {why}")
            out.append({"provider": name, "mode": "fwd+bwd", "skipped": why})
    for name in select_providers(names, fns, "naive", device, skipped):
        fn = fns[name]

        def fwd_bwd(fn=fn):
            loss = fn()
            loss.backward()
            losses[name] = loss.item()
            # freed here, not at the next call's start: a call whose start frees the last one's dX and dW had its
            # peak taken over a baseline that still counted them (128 MiB for 285 unfused, run to run)
            hidden.grad = weight.grad = None

        seconds, peak = measure(fwd_bwd, device, reps=reps)
        out.append({"provider": name, "mode": "fwd+bwd", "ms": seconds * 1e3, "peak_MiB": peak / 2 ** 20,
                    "loss": losses[name]})
    base = next((r for r in out if r["provider"] == "naive"), None)
    for r in out:
        if base and "ms" in r:
            r["time_vs_naive"] = r["ms"] / base["ms"]
            r["peak_vs_naive"] = r["peak_MiB"] / base["peak_MiB"] if base["peak_MiB"] else None
    return out


def main(argv=None):
    args, device, workload, reps = bench_args("PACT loss head benchmark", WORKLOADS, "W-logprob", "cpu", 5, 3, argv)
    rows = run(workload, device, reps, args.providers)
    print(f"PACT loss head  workload={workload}  device={device}  {WORKLOADS[workload]}")
    print_table(rows, ["provider", "mode", "ms", "peak_MiB", "time_vs_naive", "peak_vs_naive", "loss", "skipped"])
    if args.json:
        write_json(args.json, {"bench": "fused_pact_head", "workload": workload,
                               "shape": {k: str(v) for k, v in WORKLOADS[workload].items()},
                               "machine": {**machine_info(device), "load_average": os.getloadavg()}, "reps": reps,
                               "rows": rows})


if __name__ == "__main__":
    main()
