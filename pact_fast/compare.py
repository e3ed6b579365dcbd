"""``pact-fast compare``: the baselines and PACT on equal budgets, side by side.

Each mode (``sft``, ``grpo``, ``sft_then_grpo``, ``pact``) trains from the same initial weights,
with the same seeds, data order, rollout budget (prompts x group size x steps) and optimizer;
only ``loss.mode`` differs. Each is evaluated greedily, prompt-only, on the same held-out tasks.
Writes ``compare.json`` (one row per run) and ``compare.png`` under ``train.out_dir`` (``pact-fast compare``:
``runs/compare`` when it is left at train's default, ``runs/pact``) and prints the table.

With ``seeds`` (``pact-fast compare --seeds 0 1 2``) every mode runs once per seed (``train.seed``,
``data.seed`` and, where the mode draws anchors, ``loss.seed`` set to it; runs in ``out_dir/seed<k>/<mode>``)
and the table gives each mode's mean held-out success with its standard deviation and range over the seeds
(also in ``compare_summary.json``). A run whose directory already holds a finished run of the same configuration
is read back, not trained again, and an unfinished one is resumed from its last checkpoint, so an interrupted
comparison continues where it stopped; a directory holding a run of another configuration is refused, as is an
``out_dir`` that is itself a training run's directory (an arm's config.yaml reused as ``--config`` names its run).

Each run's config.yaml holds the options its mode reads; one it does not read (``loss.anchor_q`` in the sft
run, ``loss.seed`` in the grpo run) stays at its default there, so the file is a ``--config`` that
``pact-fast train`` accepts.
"""
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

from . import checkpoint
from . import distributed as dist
from .config import (RUN_CONFIG, ConfigError, check_modes, config_changes, defaults_for, load_config, one_off_fields,
                     unread_options)
from .data import load_data
from .files import write_json
from .plots import pyplot
from .tables import text_table
from .trainer import check_run_dir_writable, train

# Where `pact-fast compare` writes when train.out_dir is left at its default (train's own run directory)
COMPARE_DIR = "runs/compare"
# Options that do not change what a run computes: a run that differs only in these is reused (read back or
# resumed); the one-off options (train.stop_after) too, which a run's config.yaml keeps at their defaults.
_COSMETIC = {"train.out_dir", "train.progress", "train.tensorboard", "train.wandb", "train.wandb_project",
             "train.save_every", "train.save_every_minutes", "train.keep_last"} | \
    {f"{section}.{key}" for section, key, _ in one_off_fields()}


def compare(config, modes=("sft", "grpo", "sft_then_grpo", "pact"), seeds=None, log=print):
    """Train every mode (for every seed in ``seeds``; None: the config's own, one run per mode) and return
    one row per run: mode, seed, held-out success/reward after training, steps, seconds, whether it was
    interrupted or stopped (the runs after such a run are not run). ``log``: the progress lines (under torchrun
    rank 0's; every rank's runs log through it as ``train`` does); the table is printed on stdout."""
    check_modes(config, modes)  # an option no compared mode reads, or one a mode cannot train with
    # a data mistake is reported before any run directory is made
    load_data(config.data, needs_trace=set(modes) != {"grpo"})
    root = Path(config.train.out_dir)
    check_run_dir_writable(root)  # a file, or a directory it cannot write: one line, before any run
    _refuse_run_dir_as_root(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds if seeds else [None]:
        for mode in modes:
            run_dir = root / mode if seed is None else root / f"seed{seed}" / mode
            cfg = _run_config(config, mode, seed, run_dir)
            state, summary = _earlier_run(cfg)
            if state is None:  # every run's directory is checked before the first run trains
                _refuse_other_run(cfg)
            runs.append((seed, mode, run_dir, cfg, state, summary))
    rows = []
    say = log if dist.launch_rank() == 0 else dist.silent  # (the process group starts in the first run's train)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # an environment's print: stdout is the table
            _train_all(runs, rows, say, log)
    except BaseException:  # a Ctrl-C before a run's first step, or an error: the runs done so far are reported
        if rows:
            _report(root, rows, seeds, log)
        raise
    return _report(root, rows, seeds, log)


def _train_all(runs, rows, say, log):
    """Train (or read back, or resume) each of ``runs`` in turn, appending its row to ``rows``; stop after a run that
    was interrupted or stopped."""
    for seed, mode, run_dir, cfg, state, summary in runs:
        if state == "finished":
            say(f"[compare] {run_dir} holds this run, finished: reading it back")
        elif state == "unfinished":
            say(f"[compare] {run_dir} holds this run, unfinished: resuming it")
            summary = train(cfg, resume=str(run_dir), log=log)
        else:
            say(f"[compare] training {mode}{'' if seed is None else f' (seed {seed})'} for {cfg.train.steps} "
                f"steps -> {run_dir}")
            summary = train(cfg, log=log)
        rows.append({"mode": mode, "seed": cfg.train.seed, **(summary["eval_after"] or {}),
                     "steps": summary["steps"], "train_seconds": summary["seconds"],
                     "untrained_success_rate": (summary["eval_before"] or {}).get("success_rate"),
                     "interrupted": bool(summary["interrupted"]), "stopped": summary["stopped"],
                     "run_dir": str(run_dir)})
        if summary["interrupted"] or summary["stopped"]:
            say(f"[compare] {mode} ended after {summary['steps']} of {cfg.train.steps} steps "
                f"({'interrupted' if summary['interrupted'] else summary['stopped']}); the runs after it are "
                "not run")
            break


def _run_config(config, mode, seed, run_dir):
    """The config of one run: ``config`` under ``mode`` (its seeds set to ``seed`` unless None) in ``run_dir``,
    with every option ``mode`` leaves unread back at its default, as a ``train`` of that mode would have it."""
    cfg = copy.deepcopy(config)
    cfg.loss.mode = mode
    cfg.train.out_dir = str(run_dir)
    if seed is not None:
        cfg.train.seed = cfg.data.seed = cfg.loss.seed = seed
    defaults = defaults_for(cfg)
    for key in unread_options(cfg):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, getattr(getattr(defaults, section), name))
    return cfg


def _differences(stored, cfg):
    """The options that make the run of config ``stored`` another run than ``cfg``'s: those that differ, less the
    cosmetic ones and those ``cfg`` leaves unread (a run written before unread options were reset keeps them)."""
    return {key for key, _, _ in config_changes(stored, cfg)} - _COSMETIC - set(unread_options(cfg))


def _refuse_other_run(cfg):
    """A ``ConfigError`` naming what differs when ``cfg.train.out_dir`` holds a run of another configuration."""
    from .trainer import check_fresh_run_dir

    try:
        check_fresh_run_dir(cfg.train.out_dir)
    except ConfigError:
        try:
            stored = load_config(str(Path(cfg.train.out_dir) / "config.yaml"), label=RUN_CONFIG)
            changed = sorted(_differences(stored, cfg))
        except (OSError, ValueError):
            changed = ["its config.yaml cannot be read"]
        raise ConfigError(f"compare: {cfg.train.out_dir} holds a run of another configuration ({', '.join(changed)});"
                          " delete it or compare into another --out") from None


def _refuse_run_dir_as_root(root):
    """A ``ConfigError`` when ``root`` is a training run's directory (an arm's config.yaml reused as ``--config``
    names its own run as ``train.out_dir``): the comparison's runs would be made inside that run."""
    if checkpoint.is_run_dir(root):
        raise ConfigError(f"compare: {root} is the directory of a training run (its config.yaml with checkpoints or "
                          "metrics.jsonl); a comparison there would put its runs inside that run: compare into another "
                          "--out")


def _earlier_run(cfg):
    """What ``cfg.train.out_dir`` holds of a run of exactly this configuration: ``("finished", summary)``,
    ``("unfinished", None)`` when it has a checkpoint to resume from, else ``(None, None)``."""
    run_dir = Path(cfg.train.out_dir)
    try:
        stored = load_config(run_dir / "config.yaml", label=RUN_CONFIG)
    except (OSError, ValueError):
        return None, None
    if _differences(stored, cfg):
        return None, None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if summary and summary.get("steps") == cfg.train.steps and not summary.get("interrupted") \
            and not summary.get("stopped"):
        return "finished", summary
    if checkpoint.has_checkpoint(run_dir):
        return "unfinished", None
    return None, None


def _report(root, rows, seeds, log):
    """Print the table and write compare.json (compare_summary.json with ``seeds``) and compare.png; under
    torchrun rank 0 alone does. Returns ``rows``."""
    if dist.rank() != 0:
        return rows
    summary = summarize(rows) if seeds else None
    print(format_table(rows) if summary is None else format_summary(summary))
    write_json(root / "compare.json", rows)
    if summary is not None:
        write_json(root / "compare_summary.json", summary)
    _plot(root, rows, log)
    return rows


def summarize(rows):
    """Per mode over its runs (seeds): n, mean / standard deviation / min / max of held-out success, mean
    reward and answer rate after training; runs without an evaluation (interrupted) are left out, as are runs
    evaluated before the answer rate was measured, from that statistic."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        done = [r for r in rows if r["mode"] == mode and r.get("success_rate") is not None]
        entry = {"mode": mode, "n": len(done), "seeds": [r["seed"] for r in done]}
        for key in ("success_rate", "mean_reward", "answer_rate"):
            values = [r[key] for r in done if r.get(key) is not None]
            entry[key] = {"mean": statistics.fmean(values) if values else None,
                          "std": statistics.stdev(values) if len(values) > 1 else None,
                          "min": min(values, default=None), "max": max(values, default=None),
                          "values": values}
        out.append(entry)
    return out


def format_summary(summary):
    """The multi-seed table: per mode, the seeds run, mean held-out success, its standard deviation and range,
    the mean reward and the mean answer rate."""
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    shown = [{"mode": e["mode"], "seeds": str(e["n"]), "success_mean": fmt(e["success_rate"]["mean"]),
              "std": fmt(e["success_rate"]["std"]), "min": fmt(e["success_rate"]["min"]),
              "max": fmt(e["success_rate"]["max"]), "reward_mean": fmt(e["mean_reward"]["mean"]),
              "answered_mean": fmt(e["answer_rate"]["mean"])} for e in summary]
    return text_table(shown, ["mode", "seeds", "success_mean", "std", "min", "max", "reward_mean", "answered_mean"])


def format_table(rows):
    """The comparison table; a mode that did not finish shows '-' where it has no held-out evaluation."""
    columns = [("success", "success_rate", ".3f"), ("reward", "mean_reward", ".3f"),
               ("answered", "answer_rate", ".3f"), ("calls/ep", "tool_calls_per_episode", ".2f"),
               ("tokens/ep", "tokens_per_episode", ".1f"), ("train_s", "train_seconds", ".0f")]
    shown = [{"mode": r["mode"], **{name: "-" if r.get(key) is None else format(r[key], spec)
                                    for name, key, spec in columns}} for r in rows]
    return text_table(shown, ["mode"] + [name for name, _, _ in columns])


def _reward_curve(run_dir):
    """(steps, rollout reward) of one run's metrics.jsonl; None when the file is missing or damaged."""
    try:
        metrics = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
        points = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return [p[0] for p in points], [p[1] for p in points]


def _plot(root, rows, log):
    """compare.png: each mode's training reward (the mean over seeds, their range shaded) and held-out success
    (mean over seeds, bars from min to max). A run whose metrics.jsonl cannot be read is left out of the reward
    curves, with a line in ``log``."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for mode in modes:
        curves = []
        for r in rows:
            if r["mode"] == mode:
                curve = _reward_curve(r["run_dir"])
                if curve is None:
                    log(f"[compare] {r['run_dir']}/metrics.jsonl cannot be read: compare.png leaves its reward curve "
                        "out")
                else:
                    curves.append(curve)
        n = min((len(steps) for steps, _ in curves), default=0)
        if n == 0:
            continue
        steps = curves[0][0][:n]
        values = [c[1][:n] for c in curves]
        mean = [sum(v) / len(v) for v in zip(*values)]
        line, = axes[0].plot(steps, mean, label=mode)
        if len(values) > 1:
            axes[0].fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)],
                                 color=line.get_color(), alpha=0.2)
    axes[0].set_title("rollout reward (training" + (", mean and range over seeds)" if len(rows) > len(modes) else ")"))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean reward")
    axes[0].legend()
    done = [e for e in summarize(rows) if e["n"]]  # modes that reached their evaluation
    means = [e["success_rate"]["mean"] for e in done]
    spread = [[m - e["success_rate"]["min"] for m, e in zip(means, done)],
              [e["success_rate"]["max"] - m for m, e in zip(means, done)]]
    axes[1].bar([e["mode"] for e in done], means, yerr=spread if len(rows) > len(modes) else None, capsize=4)
    axes[1].set_title("held-out success (greedy, prompt-only)")
    axes[1].set_ylabel("success rate")
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=90)
    plt.close(fig)
