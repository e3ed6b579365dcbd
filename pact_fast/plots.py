"""Training curves from ``metrics.jsonl``: one PNG, one panel per quantity that has data, runs overlaid.

    pact-fast plot runs/pact                      # runs/pact/curves.png
    pact-fast plot runs/cmp/sft runs/cmp/pact --out modes.png

Panels: rollout reward; each loss term on its own axes (the total would hide the SFT term in SFT-only
phases); held-out success and answer rate at every evaluation (``train.eval_every``); the PACT diagnostics:
ratio of the trace-conditioned and prompt-only contexts, their clip fractions, the SFT weights, the anchoring
fraction.
"""
import json
from pathlib import Path

# (title, y label, [(metric key, legend label)]); a panel is drawn when any run has any of its keys
PANELS = [
    ("rollout reward", "mean reward", [("reward_mean", "reward")]),
    ("held-out success (greedy, prompt-only)", "fraction of episodes", [("eval/success_rate", "success"),
                                                                       ("eval/answer_rate", "answered")]),
    ("total loss", "loss", [("loss/total", "total")]),
    ("RL surrogate", "loss", [("loss/rl", "rl")]),
    ("trace SFT (per trace token)", "weighted NLL", [("loss/sft", "sft")]),
    ("KL to the reference", "KL estimate", [("loss/kl", "kl")]),
    ("ratio pi / pi_old", "mean ratio", [("tc/ratio_mean", "trace-conditioned"), ("po/ratio_mean", "prompt-only")]),
    ("clipped tokens", "fraction", [("tc/clip_frac_high", "tc high"), ("tc/clip_frac_low", "tc low"),
                                    ("po/clip_frac_high", "po high"), ("po/clip_frac_low", "po low")]),
    ("SFT weight by component", "mean token weight", [("sft_weight/tool_call", "tool calls"),
                                                       ("sft_weight/reasoning", "reasoning"),
                                                       ("sft_weight/other", "other")]),
    ("prompt-only anchoring", "fraction of groups", [("anchor_frac", "anchored")]),
    ("throughput", "tokens / s", [("tokens_per_second", "tokens/s")]),
]


def read_metrics(run_dir):
    """The rows of ``run_dir/metrics.jsonl`` (a run directory or the file itself; a comparison's directory is a
    ``FileNotFoundError`` naming its runs). A last line cut short (a run
    writing it, or killed while it did) is left out; any other line that is not a JSON object is a ``ValueError``
    naming the file and line, as is a file without a row."""
    path = Path(run_dir)
    if (path / "compare.json").is_file() and not (path / "metrics.jsonl").exists():  # `plot runs/compare`
        runs = sorted(str(m.parent) for m in path.glob("**/metrics.jsonl"))
        raise FileNotFoundError(f"{run_dir}: a comparison, not a run (its plot is {path / 'compare.png'}); give "
                                f"its runs' directories: {' '.join(runs[:4])}{' ...' if len(runs) > 4 else ''}")
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a pact-fast run directory?)")
    text = path.read_text()  # once: a writer may finish its row meanwhile
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last row, still being written
            raise ValueError(f"{path}:{number}: not a JSON row ({exc})") from None
        if not isinstance(rows[-1], dict):
            raise ValueError(f"{path}:{number}: not a JSON object of a step's metrics")
    if not rows:
        raise ValueError(f"{path}: no step logged yet")
    return rows


def run_labels(run_dirs):
    """A legend label per run: its directory's name, with as many parent directories as make the labels
    distinct (``seed0/pact`` and ``seed1/pact`` where both are ``pact``)."""
    parts = [(Path(d).parent if Path(d).is_file() else Path(d)).resolve().parts for d in run_dirs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def panels_with_data(runs):
    """The entries of ``PANELS`` that some run (a list of metrics rows) has a value for."""
    return [p for p in PANELS if any(key in row for rows in runs for key, _ in p[2] for row in rows)]


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_runs(run_dirs, png_path, labels=None):
    """Write the panels of every run in ``run_dirs`` to ``png_path``; returns the path, or None without
    matplotlib. Runs without a value of any panel's quantity are a ``ValueError`` (not an empty picture)."""
    plt = pyplot()
    if plt is None:
        return None
    runs = [(label, read_metrics(d)) for label, d in zip(labels or run_labels(run_dirs), run_dirs)]
    panels = panels_with_data([rows for _, rows in runs])
    if not panels:
        raise ValueError(f"{', '.join(map(str, run_dirs))}: no metrics row has a quantity to plot (reward_mean, "
                         "eval/success_rate, loss/total, ...); not a pact-fast run's metrics.jsonl?")
    ncols = min(3, len(panels)) or 1
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.3 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (title, ylabel, keys) in zip(axes.flat, panels):
        for r, (label, rows) in enumerate(runs):
            for s, (key, key_label) in enumerate(keys):
                points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
                if not points:
                    continue
                name = " ".join(x for x in (label if len(runs) > 1 else "", key_label if len(keys) > 1 else "") if x)
                ax.plot(*zip(*points), linestyle=styles[s % len(styles)], color=colors[r % len(colors)],
                        marker="o" if key.startswith("eval/") else None, label=name or None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if any(key.startswith("eval/") for key, _ in keys):
            ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    png_path = _save_whole(fig, png_path)
    plt.close(fig)
    return png_path


def _save_whole(fig, path):
    """``fig`` at ``path`` (``.png`` added to a name without a suffix, as matplotlib does), whole or not at all:
    drawn into a temporary file beside it, then renamed over it (a run killed or out of disk while its curves.png is
    drawn keeps the previous picture, never a cut one). Returns the path written."""
    import os

    path = Path(path)
    if not path.suffix:
        path = path.with_name(f"{path.name}.png")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=90, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
