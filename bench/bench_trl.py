"""PACT inside TRL: one micro-batch of PACTGRPOTrainer's loss, padded against packed scoring.

    python bench/bench_trl.py                       # W-cpu group shape (bench_group.py), fp32 on CPU
    python bench/bench_trl.py --workload W-group    # CUDA, Qwen3-1.7B-shaped

The micro-batch is one PACT group (SPEC section 2): G rollouts of R tokens after a prompt of P tokens,
their trace-conditioned copies (prompt + trace block of T tokens) and the trace (E tokens after the
prompt and a U-token header). Providers, side by side in one process, forward+backward of the loss:

- trl-grpo: GRPOTrainer's own loss on the prompt-only rollouts (what a TRL user runs today, without PACT);
- pact-padded: PACTGRPOTrainer with TRL's three padded forwards (scoring="padded");
- pact-packed: PACTGRPOTrainer with one tree-packed forward (scoring="packed").

Ratios are against pact-padded; the losses of the two PACT providers are checked against each other.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_group import WORKLOADS, make_group, make_model  # noqa: E402
from common import bench_args, machine_info, measure, print_table, select_providers, write_json  # noqa: E402

from pact_fast.chat import LabeledSequence  # noqa: E402
from pact_fast.losses import OTHER, REASONING, TOOL_CALL  # noqa: E402


def make_trainer(model, w, scoring, out_dir):
    from datasets import Dataset
    from trl import GRPOConfig

    from pact_fast.adapters.trl import PACTGRPOTrainer, pact_config_from_grpo_args
    from pact_fast.envs.tokenizer import build_tokenizer

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=w["G"], num_generations=w["G"],
                      max_completion_length=w["R"], report_to=[], save_strategy="no",
                      use_cpu=not torch.cuda.is_available(), bf16=w["dtype"] == torch.bfloat16,
                      gradient_checkpointing=False)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}], "trace": "[]"}])
    trainer = PACTGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=rows, processing_class=build_tokenizer(), scoring=scoring,
                              pact_config=pact_config_from_grpo_args(args, anchor_q=0.0))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which does not run here
    return trainer


def make_inputs(w, device):
    """The dict PACTGRPOTrainer._generate_and_score_completions hands to the loss, for one group."""
    seqs, _ = make_group(w)
    P, T, U, E, G, R = (w[k] for k in "PTUEGR")
    tc_prompt, prompt, trace = seqs[0][:P + T], seqs[G][:P], seqs[-1]
    completions = torch.tensor([s[P + T:] for s in seqs[:G]], device=device)
    pattern = [REASONING] * 6 + [TOOL_CALL] * 4 + [OTHER] * 2
    components = [0] * (P + U) + [pattern[i % len(pattern)] for i in range(E)]
    ones = lambda n: torch.ones(G, n, dtype=torch.long, device=device)  # noqa: E731
    return {
        "prompt_ids": torch.tensor([prompt] * G, device=device), "prompt_mask": ones(P),
        "completion_ids": completions, "completion_mask": ones(R),
        "pact_tc_prompt_ids": torch.tensor([tc_prompt] * G, device=device), "pact_tc_prompt_mask": ones(P + T),
        "advantages": torch.linspace(-1, 1, G, device=device), "num_items_in_batch": torch.tensor(float(G * R)),
        "pact_anchored": torch.zeros(G, dtype=torch.bool, device=device),
        "pact_group": torch.zeros(G, dtype=torch.long, device=device),
        "pact_sft": [[LabeledSequence(trace, components, [0] * len(trace), [0] * len(trace))]] + [[]] * (G - 1),
        "pact_n_sft": torch.tensor(1.0),
    }


def run(workload, device, reps, names=None):
    from trl import GRPOTrainer

    w = WORKLOADS[workload]
    model = make_model(w, device)
    inputs = make_inputs(w, device)
    rows, losses = [], {}
    with tempfile.TemporaryDirectory() as out_dir:
        padded = make_trainer(model, w, "padded", out_dir)
        packed = make_trainer(model, w, "packed", out_dir)
        providers = {
            "trl-grpo": lambda: GRPOTrainer._compute_loss(padded, padded.model, inputs),
            "pact-padded": lambda: padded._compute_loss(padded.model, inputs),
            "pact-packed": lambda: packed._compute_loss(packed.model, inputs),
        }
        for name in select_providers(names, providers, "pact-padded", device):
            loss_fn = providers[name]
            losses[name] = loss_fn().item()

            def fwd_bwd(f=loss_fn):
                model.zero_grad(set_to_none=True)
                f().backward()

            seconds, peak = measure(fwd_bwd, device, reps=reps)
            rows.append({"provider": name, "ms": seconds * 1e3, "peak_MiB": peak / 2 ** 20, "loss": losses[name]})
    base = next((r for r in rows if r["provider"] == "pact-padded"), None)
    for row in rows:
        if base:
            row["speedup_vs_padded"] = base["ms"] / row["ms"]
            row["mem_reduction_vs_padded"] = base["peak_MiB"] / row["peak_MiB"] if row["peak_MiB"] else None
    return rows


def main(argv=None):
    args, device, workload, reps = bench_args("PACT in TRL: padded vs packed scoring", WORKLOADS, "W-group", "W-cpu",
                                              5, 3, argv)
    rows = run(workload, device, reps, args.providers)
    print(f"PACTGRPOTrainer loss, one group  workload={workload}  device={device}")
    print_table(rows, ["provider", "ms", "peak_MiB", "speedup_vs_padded", "mem_reduction_vs_padded", "loss"])
    if args.json:
        import transformers
        import trl

        versions = {"trl": trl.__version__, "transformers": transformers.__version__}
        write_json(args.json, {"bench": "trl", "workload": workload, "versions": versions,
                               "shape": {k: str(v) for k, v in WORKLOADS[workload].items()},
                               "machine": machine_info(device), "rows": rows})


if __name__ == "__main__":
    main()
