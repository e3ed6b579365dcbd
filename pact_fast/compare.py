"""``pact-fast compare``: the baselines and PACT on equal budgets, side by side.

Each mode (``sft``, ``grpo``, ``sft_then_grpo``, ``pact``) trains from the same initial weights,
with the same seeds, data order, rollout budget (prompts x group size x steps) and optimizer;
only ``loss.mode`` differs. Each is evaluated greedily, prompt-only, on the same held-out tasks.
Writes ``compare.json`` and ``compare.png`` under ``train.out_dir`` and prints the table.
"""
import copy
import json
from pathlib import Path

from .trainer import train


def compare(config, modes=("sft", "grpo", "sft_then_grpo", "pact"), log=print):
    root = Path(config.train.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        cfg = copy.deepcopy(config)
        cfg.loss.mode = mode
        cfg.train.out_dir = str(root / mode)
        log(f"[compare] training {mode} for {cfg.train.steps} steps -> {cfg.train.out_dir}")
        summary = train(cfg, log=log)
        rows.append({"mode": mode, **(summary["eval_after"] or {}), "steps": summary["steps"],
                     "train_seconds": summary["seconds"],
                     "untrained_success_rate": (summary["eval_before"] or {}).get("success_rate")})
    header = f"{'mode':<15}{'success':>9}{'reward':>9}{'tokens/ep':>11}{'train s':>9}"
    lines = [header] + [f"{r['mode']:<15}{r['success_rate']:>9.3f}{r['mean_reward']:>9.3f}"
                        f"{r['tokens_per_episode']:>11.1f}{r['train_seconds']:>9.0f}" for r in rows]
    print("\n".join(lines))
    with open(root / "compare.json", "w") as f:
        json.dump(rows, f, indent=1)
    _plot(root, rows)
    return rows


def _plot(root, rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for r in rows:
        metrics = [json.loads(line) for line in open(root / r["mode"] / "metrics.jsonl")]
        steps = [m["step"] for m in metrics if "reward_mean" in m]
        axes[0].plot(steps, [m["reward_mean"] for m in metrics if "reward_mean" in m], label=r["mode"])
    axes[0].set_title("rollout reward (training)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].bar([r["mode"] for r in rows], [r["success_rate"] for r in rows])
    axes[1].set_title("held-out success (greedy, prompt-only)")
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=90)
    plt.close(fig)
