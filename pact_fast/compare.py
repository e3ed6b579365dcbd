"""``pact-fast compare``: the baselines and PACT on equal budgets, side by side.

Each mode (``sft``, ``grpo``, ``sft_then_grpo``, ``pact``) trains from the same initial weights,
with the same seeds, data order, rollout budget (prompts x group size x steps) and optimizer;
only ``loss.mode`` differs. Each is evaluated greedily, prompt-only, on the same held-out tasks.
Writes ``compare.json`` and ``compare.png`` under ``train.out_dir`` and prints the table.
"""
import copy
import json
from pathlib import Path

from .plots import pyplot
from .tables import text_table
from .trainer import load_data, train


def compare(config, modes=("sft", "grpo", "sft_then_grpo", "pact"), log=print):
    load_data(config.data)  # a data mistake is reported before any run directory is made
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
        if summary["interrupted"] or summary["stopped"]:
            log(f"[compare] {mode} ended after {summary['steps']} of {cfg.train.steps} steps "
                f"({'interrupted' if summary['interrupted'] else summary['stopped']}); the modes after it are not run")
            break
    print(format_table(rows))
    with open(root / "compare.json", "w") as f:
        json.dump(rows, f, indent=1)
    _plot(root, rows)
    return rows


def format_table(rows):
    """The comparison table; a mode that did not finish shows '-' where it has no held-out evaluation."""
    columns = [("success", "success_rate", ".3f"), ("reward", "mean_reward", ".3f"),
               ("tokens/ep", "tokens_per_episode", ".1f"), ("train_s", "train_seconds", ".0f")]
    shown = [{"mode": r["mode"], **{name: "-" if r.get(key) is None else format(r[key], spec)
                                    for name, key, spec in columns}} for r in rows]
    return text_table(shown, ["mode"] + [name for name, _, _ in columns])


def _plot(root, rows):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for r in rows:
        metrics = [json.loads(line) for line in open(root / r["mode"] / "metrics.jsonl")]
        steps = [m["step"] for m in metrics if "reward_mean" in m]
        axes[0].plot(steps, [m["reward_mean"] for m in metrics if "reward_mean" in m], label=r["mode"])
    axes[0].set_title("rollout reward (training)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    done = [r for r in rows if r.get("success_rate") is not None]  # modes that reached their evaluation
    axes[1].bar([r["mode"] for r in done], [r["success_rate"] for r in done])
    axes[1].set_title("held-out success (greedy, prompt-only)")
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=90)
    plt.close(fig)
