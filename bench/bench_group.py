"""Benchmark of one PACT group's scoring: the packed trie pass against unshared baselines.

    python bench/bench_group.py                        # W-cpu: the W-group shape at 1/16 scale, tiny model
    python bench/bench_group.py --workload W-group --json out.json   # CUDA, Qwen3-1.7B-shaped, bf16

The group (SPEC section 2): G rollouts y_i of R tokens, each scored trace-conditioned
(shared prompt P + trace block T + y_i) and prompt-only (P + header U + y_i), plus the trace as
assistant turns (P + U + E). Every provider computes the same log-probs (all response tokens of
both copies, all trace tokens) and, in fwd+bwd mode, their gradient into every parameter:

- packed-<attn>: one pass over the token trie (``pact_fast.scoring``) with that attention backend;
- b2b-<attn>: the same sequences back to back with no sharing (block-diagonal causal), the same
  model code, attention and log-prob op: what padding-free RL trainers run today;
- separate: each sequence through the model's own forward, one at a time.

Times and peak memory are measured side by side in one process; ratios are against b2b-varlen.
The log-probs of every provider are checked against the first one (max abs difference).
"""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, machine_info, measure, print_table, select_providers, write_json  # noqa: E402

from pact_fast.ops import linear_logprobs  # noqa: E402
from pact_fast.packing import pack_back_to_back, pack_tree  # noqa: E402
from pact_fast.scoring import score_packed  # noqa: E402

WORKLOADS = {
    # model: Qwen3-shaped; group sizes P, T, U, E, G, R
    "W-group": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936,
                    P=4096, T=2048, U=16, E=2048, G=8, R=1024, dtype=torch.bfloat16),
    # 1/16 of W-group in group sizes and vocabulary; width cut to 256 and depth chosen so the model keeps
    # Qwen3-1.7B's body-to-lm_head parameter ratio (1.41B : 0.31B = 4.5; here 14 x 0.79M : 2.43M = 4.5), since
    # that ratio bounds what sharing can save (the lm_head rows are the same in every provider).
    "W-cpu": dict(layers=14, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=768, vocab=151936 // 16,
                  P=256, T=128, U=8, E=128, G=8, R=64, dtype=torch.float32),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=500,
                 P=32, T=16, U=4, E=16, G=4, R=8, dtype=torch.float32),
}


def make_model(w, device):
    from pact_fast.models import random_qwen3

    model = random_qwen3(w["vocab"], hidden_size=w["hidden"], intermediate_size=w["ffn"], num_layers=w["layers"],
                         num_heads=w["heads"], num_kv_heads=w["kv_heads"], head_dim=w["head_dim"],
                         max_positions=w["P"] + w["T"] + w["R"] + w["E"] + 64, seed=0, dtype=w["dtype"],
                         tie_word_embeddings=False)
    return model.to(device).train()


def make_group(w, seed=0):
    """Sequences and, per sequence, the token positions whose log-probs PACT needs."""
    rng = random.Random(seed)
    run = lambda n: [rng.randrange(w["vocab"]) for _ in range(n)]  # noqa: E731
    P, T, U, E, G, R = (w[k] for k in "PTUEGR")
    prompt, trace, header, h = run(P), run(T), run(U), run(E)
    ys = [run(R) for _ in range(G)]
    seqs = [prompt + trace + y for y in ys] + [prompt + header + y for y in ys] + [prompt + header + h]
    scored = [torch.arange(P + T, P + T + R)] * G + [torch.arange(P + U, P + U + R)] * G + \
             [torch.arange(P + U, P + U + E)]
    return seqs, scored


def providers(model, seqs, scored, device):
    """name -> fn() returning the concatenated fp32 log-probs of every scored token."""
    out = {}
    attn = ["varlen", "triton", "flex"] if device.type == "cuda" else ["varlen", "sdpa"]
    for layout_name, pack in (("packed", pack_tree), ("b2b", pack_back_to_back)):
        packed = pack(seqs)
        rows, targets, _ = packed.predictor_rows(token_ids=scored)
        for backend in attn:
            out[f"{layout_name}-{backend}"] = (
                lambda p=packed, r=rows, t=targets, b=backend: score_packed(model, p, r, t, backend=b))
    head = model.get_output_embeddings()

    def separate():
        logps = []
        for s, idx in zip(seqs, scored):
            ids = torch.tensor(s, device=device)[None]
            hidden = model.model(input_ids=ids).last_hidden_state[0]
            logps.append(linear_logprobs(hidden[idx - 1], head.weight, ids[0, idx]))
        return torch.cat(logps)

    out["separate"] = separate
    return out


def run(workload, device, reps, names=None):
    w = WORKLOADS[workload]
    model = make_model(w, device)
    seqs, scored = make_group(w)
    n_tree, n_flat = pack_tree(seqs).num_tokens, sum(map(len, seqs))
    grads = None
    rows, reference = [], None
    fns = providers(model, seqs, scored, device)
    for name in select_providers(names, fns, "b2b-varlen", device):
        fn = fns[name]
        with torch.no_grad():
            logp = fn().float()
        reference = logp if reference is None else reference
        if grads is None:
            grads = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)).to(device)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            (fn() * grads).sum().backward()

        def fwd():
            with torch.no_grad():
                fn()

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            seconds, peak = measure(call, device, reps=reps)
            rows.append({"provider": name, "mode": mode, "ms": seconds * 1e3, "peak_MiB": peak / 2 ** 20,
                         "max_abs_diff": (logp - reference).abs().max().item()})
    model.zero_grad(set_to_none=True)
    base_name = "b2b-varlen"
    for row in rows:
        base = next((r for r in rows if r["provider"] == base_name and r["mode"] == row["mode"]), None)
        if base:
            row["speedup_vs_b2b"] = base["ms"] / row["ms"]
            row["mem_reduction_vs_b2b"] = base["peak_MiB"] / row["peak_MiB"] if row["peak_MiB"] else None
    return rows, {"tokens_tree": n_tree, "tokens_back_to_back": n_flat, "scored_tokens": int(sum(map(len, scored)))}


def main(argv=None):
    args, device, workload, reps = bench_args("PACT group scoring benchmark", WORKLOADS, "W-group", "W-cpu", 5, 3, argv)
    rows, tokens = run(workload, device, reps, args.providers)
    print(f"group scoring  workload={workload}  device={device}  {tokens}")
    print_table(rows, ["provider", "mode", "ms", "peak_MiB", "speedup_vs_b2b", "mem_reduction_vs_b2b", "max_abs_diff"])
    if args.json:
        write_json(args.json, {"bench": "group", "workload": workload, "tokens": tokens,
                               "shape": {k: str(v) for k, v in WORKLOADS[workload].items()},
                               "machine": machine_info(device), "rows": rows})


def test_group_packed_fwd_bwd(benchmark):
    """pytest-benchmark entry: the packed pass on the tiny workload, forward+backward."""
    w = WORKLOADS["tiny"]
    model = make_model(w, torch.device("cpu"))
    seqs, scored = make_group(w)
    packed = pack_tree(seqs)
    rows, targets, _ = packed.predictor_rows(token_ids=scored)

    def step():
        model.zero_grad(set_to_none=True)
        score_packed(model, packed, rows, targets).sum().backward()

    benchmark(step)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    main()
