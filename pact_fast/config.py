"""Typed configuration: one dataclass per concern, loaded from YAML and ``key=value`` overrides.

    pact-fast train --config run.yaml train.steps=100 loss.anchor_q=0.5 rollout.group_size=8

Every field has a default and a help string; an unknown key or a value of the wrong type is an
error that names it and lists the valid keys or choices. The resolved config is saved with every run.
"""
import dataclasses
import io
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import yaml

from .files import write_text
from .losses import PACTLossConfig
from .rollout import RolloutConfig


@dataclass
class LoRAConfig:
    enabled: bool = field(default=False, metadata={
        "help": "train LoRA adapters (peft) instead of all weights: no gradients or AdamW state for the base, and "
                "the reference policy (loss.beta_kl > 0) is the base with the adapters off, not a second model"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    target_modules: Tuple[str, ...] = field(default=(), metadata={
        "help": "module names to adapt, e.g. [q_proj, v_proj]; empty = every linear layer of the decoder layers "
                "(never the lm_head or a MoE router)"})
    adapter: Optional[str] = field(default=None, metadata={
        "help": "start from these adapters: a LoRA checkpoint of a run, or a peft adapter directory of plain LoRA "
                "(adapter_config.json and adapter_model.safetensors), made with the same r, alpha and target "
                "modules; another peft option (use_rslora, use_dora, ...) is refused"})
    base_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen base weights: bfloat16 halves their memory (the adapters, their gradients and "
                "AdamW state stay float32) and runs the base's forward, residual stream included, in bf16, on the "
                "CPU too; float32 = the base as a full fine-tune holds it",
        "choices": ("float32", "bfloat16")})

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r} must be >= 1")
        if not 0 < self.alpha < math.inf:  # inf: the adapters' scale alpha / r times B = 0 made every logit NaN
            raise ValueError(f"model.lora.alpha={self.alpha} must be a finite number > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.enabled:  # an option of LoRA while LoRA is off would be ignored: every weight would train
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                if f.name != "enabled" and value != f.default:
                    shown = list(value) if isinstance(value, tuple) else value
                    raise ValueError(f"model.lora.{f.name}={shown} is set but model.lora.enabled is false (it would "
                                     "be ignored: every weight would train, in float32); set model.lora.enabled=true, "
                                     "or leave it out")


@dataclass
class ModelConfig:
    path: Optional[str] = field(default=None, metadata={
        "help": "local Hugging Face causal LM directory (with its tokenizer); None = a tiny Qwen3-shaped model "
                "on the built-in tokenizer"})
    hidden_size: int = field(default=128, metadata={"help": "built-in model: hidden size"})
    num_layers: int = field(default=4, metadata={"help": "built-in model: decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "built-in model: query heads"})
    num_kv_heads: int = field(default=2, metadata={"help": "built-in model: key/value heads"})
    head_dim: int = field(default=32, metadata={"help": "built-in model: head dimension"})
    intermediate_size: int = field(default=256, metadata={"help": "built-in model: MLP width"})
    chat_template: str = field(default="auto", metadata={
        "help": "how prompts carry tools: auto = the model's chat template if a probe conversation shows the tool, "
                "a call in rollout.tool_call_format and reasoning, else the built-in tool format (pact_fast.chat); "
                "model = the model's or an error; builtin = always the built-in format",
        "choices": ("auto", "model", "builtin")})
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze_lm_head: bool = field(default=False, metadata={
        "help": "do not train the lm_head weight (tied embeddings freeze with it): the log-prob ops skip its "
                "gradient; with LoRA the head is frozen anyway"})


@dataclass
class DataConfig:
    path: Optional[str] = field(default=None, metadata={
        "help": "JSONL file in the pact_fast.data format; None = tasks of the built-in multi-hop environment"})
    eval_path: Optional[str] = field(default=None, metadata={"help": "held-out JSONL; None = split from the data"})
    train_tasks: int = field(default=400, metadata={"help": "built-in environment: training tasks"})
    eval_tasks: int = field(default=32, metadata={
        "help": "held-out tasks: built-in ones come from another world (world_seed + 1: other facts, so answers "
                "cannot be memorised); with a data file, split off its start unless eval_path is given"})
    world_seed: int = field(default=0, metadata={"help": "built-in environment: the world of the training tasks"})
    hops: tuple = field(default=(1,), metadata={"help": "built-in environment: hop counts of the tasks"})
    ops: bool = field(default=False, metadata={
        "help": "built-in environment: tasks may end with an add (numbers) or initial (words) step"})
    distractors: int = field(default=0, metadata={"help": "built-in environment: unused distractor tools"})
    seed: int = field(default=0, metadata={"help": "task generation and data order seed"})
    on_error: str = field(default="raise", metadata={"help": "bad data rows: raise or skip",
                                                     "choices": ("raise", "skip")})
    format_reward: float = field(default=0.0, metadata={
        "help": "multi-hop environment: reward for episodes whose tool calls all ran, added to the answer's 1; below "
                "1 (an episode of reward >= 1 counts as a success); refused for data without multihop rows"})
    env_modules: Tuple[str, ...] = field(default=(), metadata={
        "help": "modules (or packages) a data file's rows may take environments of your own from: a row's env name "
                "'package.module:ClassName' names a ToolEnv subclass there (pact_fast.envs.plugin); a data file "
                "alone never imports code"})


@dataclass
class TrainConfig:
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompt groups per step (all ranks together)"})
    update_epochs: int = field(default=1, metadata={"help": "passes over each step's rollouts"})
    micro_batch_tokens: int = field(default=8192, metadata={"help": "token budget of one packed micro-batch"})
    lr: float = field(default=6e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine decay"})
    warmup_steps: int = field(default=4, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = off"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, sampling and anchoring"})
    out_dir: str = field(default="runs/pact", metadata={"help": "run directory"})
    stop_after: int = field(default=0, metadata={
        "help": "stop (with a checkpoint) after this many steps of this run, keeping the schedule of `steps`; "
                "0 = run to `steps`; never saved in the run's config.yaml", "one_off": True})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end); 0 = off"})
    save_every_minutes: float = field(default=10.0, metadata={
        "help": "also checkpoint when this many minutes passed since the last checkpoint; 0 = off"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    eval_every: int = field(default=100, metadata={
        "help": "held-out evaluation every N steps (curves.png draws it as a line); 0 = before and after only"})
    attn_backend: str = field(default="auto", metadata={
        "help": "tree attention backend", "choices": ("auto", "triton", "sdpa", "varlen", "flex")})
    logprob_backend: str = field(default="auto", metadata={
        "help": "linear_logprobs backend: the update's log-probs with fused_head=false; the old and reference "
                "log-prob passes and scoring's start-up check either way", "choices": ("auto", "torch", "triton")})
    fused_head: bool = field(default=True, metadata={
        "help": "the PACT loss fused into the lm_head (pact_fast.ops.fused_pact_head: loss, dX and dW in one pass "
                "over the vocabulary, torch backend); false = linear_logprobs, then pact_loss"})
    fused_head_memory_lean: bool = field(default=False, metadata={
        "help": "fused head (fused_head=true only): work in dW's own unwritten rows and recompute the last "
                "vocabulary columns' logits, extra memory within 5% of dW (model: 1.26x three GEMMs at H=2048, "
                "against 1.15x); false = one pass, workspace within 25% of dW"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={
        "help": "CPU threads of torch's intra-op pool; 0 = OMP_NUM_THREADS if set, else the cores idle when the run "
                "starts, refitted after each step to the cores other processes leave free (pact_fast.cpu: busy "
                "cores shared with other processes slow a run that also uses them)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing"})
    liger: bool = field(default=False, metadata={"help": "liger-kernel RMSNorm/SwiGLU/RoPE patches (CUDA)"})
    tensorboard: bool = field(default=True, metadata={"help": "TensorBoard events when tensorboard is installed"})
    wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (needs wandb)"})
    wandb_project: str = field(default="pact_fast", metadata={"help": "wandb project"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    max_skipped_steps: int = field(default=5, metadata={
        "help": "a step whose loss or gradient is not finite is skipped (no update) and logged; this many "
                "consecutive skips stop the run with a checkpoint of the last good state"})

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device={self.device!r} is not valid; choose auto, cpu, cuda or cuda:N")
        if self.threads < 0:
            raise ValueError(f"train.threads={self.threads} must be >= 0 (0 = fitted to the idle cores)")
        if self.max_skipped_steps < 1:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 1")
        if self.fused_head_memory_lean and not self.fused_head:
            raise ValueError("train.fused_head_memory_lean=true needs train.fused_head=true (it is the fused head's)")


@dataclass
class ScoringConfig:
    check: bool = field(default=True, metadata={
        "help": "before training, score a small built-in group packed and with the model's own forward and refuse "
                "the model if they differ (pact_fast.scoring.check_model); off (false) skips the check"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # The built-in tiny job anneals reasoning by scale (every segment supervised, weight beta(s)): with the
    # library default (segment prefix), a tiny model whose reward is still sparse loses the supervision of the
    # trailing reasoning before RL can replace it, and its generations drift. pact_loss's own default stays segment.
    loss: PACTLossConfig = field(default_factory=lambda: PACTLossConfig(sft_reasoning_mode="scale"))
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


RUN_CONFIG = "the run's config"  # load_config's label for a run directory's own config.yaml


class ConfigError(ValueError):
    """A bad key or value; the message names it and what would be valid. ``key``: the option (``section.key``) it
    is about, where it is one (``load_config`` then names the line of a config file that set it)."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


def _coerce(value, tp, key):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else int  # Tuple[str, ...] holds strings; a bare tuple, integers
        return tuple(_coerce(v, item, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(value, _Octal) and tp in (int, float):
        raise ConfigError(_octal_message(key, value.text))
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):  # float(True) is 1.0: train.lr=yes trained at 1.0
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (list, tuple, dict)):  # str() would make "['runs/x']" a directory name
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if value is None or isinstance(value, (bool, int, float)):  # a YAML file's unquoted 010, yes or null
            raise ConfigError(f"{key}: expected a string, got {'null' if value is None else repr(value)} (YAML reads "
                              "an unquoted 010 as 8, yes as true, null as none: quote the text)")
        return str(value)
    return value


def _override_value(obj, key, raw, path):
    """The value of ``path=raw`` on the command line: the text itself for a string option (a path such as
    ``010``, ``runs/exp #2`` or ``yes`` stays what it says; YAML would read 8, ``runs/exp`` and True), YAML
    otherwise (numbers, booleans, lists)."""
    if not raw.strip():  # `model.path=$UNSET`: read as the default, it trained the built-in model on built-in tasks
        raise ConfigError(f"{path}= has no value; leave the key out for its default")
    hint = typing.get_type_hints(type(obj)).get(key)
    if hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint)):
        return raw
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)  # as a file's value: 010 refused by _coerce, not read as 8
    except _KeyError as exc:
        raise ConfigError(f"{path}={raw}: {exc.problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}={raw!r}: not a valid value (YAML: a number, true/false, or a list such as "
                          "[1, 2])") from None


def _keys_named(name):
    """Every ``section.name`` option of ``Config`` (``model.lora.name`` too) whose last part is ``name``."""
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            elif f.name == name:
                yield prefix + name

    return list(walk(Config(), ""))


def _set(obj, key, value, path):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        elsewhere = " or ".join(_keys_named(key))  # a key of another section: train.temperature for rollout's
        raise ConfigError(f"unknown key {path!r}{f' (did you mean {elsewhere}?)' if elsewhere else ''}; valid keys "
                          f"here: {', '.join(sorted(fields))}", key=path)
    f = fields[key]
    hints = typing.get_type_hints(type(obj))
    if dataclasses.is_dataclass(getattr(obj, key)):
        if not isinstance(value, dict):
            keys = sorted(f.name for f in dataclasses.fields(getattr(obj, key)))
            raise ConfigError(f"{path}: expected a section (a mapping of its keys {', '.join(keys)}), got {value!r}",
                              key=path)
        for k, v in value.items():
            _set(getattr(obj, key), k, v, f"{path}.{k}")
        return
    try:
        coerced = _coerce(value, hints[key], path)
    except ConfigError as exc:
        raise ConfigError(str(exc), key=path) from None
    choices = f.metadata.get("choices")
    if choices and coerced not in choices:
        raise ConfigError(f"{path}={coerced!r} is not valid; choose one of {list(choices)}", key=path)
    setattr(obj, key, coerced)


def _rebuild(obj, prefix=""):
    """Re-run __post_init__ checks of nested dataclasses after overrides (``prefix``: the section path of ``obj``)."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _rebuild(child, f"{prefix}{f.name}.")
            try:
                setattr(obj, f.name, type(child)(**{g.name: getattr(child, g.name) for g in dataclasses.fields(child)}))
            except ValueError as exc:  # its message starts with the key ("model.lora.r=0 must be >= 1") or, from a
                # class that also serves outside a config, with the class ("PACTLossConfig.s_end=0.0"): say the key
                message = str(exc)
                own = f"{type(child).__name__}."
                if message.startswith(own):
                    message = f"{prefix}{f.name}.{message[len(own):]}"
                raise ConfigError(message, key=re.match(r"[\w.]*", message).group()) from None


# an integer YAML 1.1 reads as octal (010 is 8; 08 and 09 are strings), where nearly everyone else reads the decimal
# number: train.save_every=010 checkpointed every 8 steps
_LEADING_ZERO = re.compile(r"[-+]?0[0-7_]+")


class _Octal(int):
    """An integer a config file wrote with a leading zero (``text``), which YAML read as octal."""

    def __new__(cls, value, text):
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


def _octal_message(key, text):
    return (f"{key}: {text} has a leading zero, which YAML reads as the octal number {int(yaml.safe_load(text))}; "
            f"write {int(text.replace('_', ''), 10)} without it")


class _KeyError(yaml.constructor.ConstructorError):
    """A key ``_UniqueKeyLoader`` refuses: YAML that parses, but not as a config."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one, quietly) and a
    section's key left empty (``path:`` reads as null: a model path forgotten there trained the built-in model);
    ``null`` written out, as a run's own config.yaml has it, stays None."""

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        _refuse_base_60(node, value)
        return _Octal(value, node.value) if _LEADING_ZERO.fullmatch(node.value) else value

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        _refuse_base_60(node, value)
        return value

    def construct_document(self, node):
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first:
                raise _KeyError(None, None, f"key {key!r} given twice (first on line {first[key]})",
                                key_node.start_mark)
            if node is not self._root and isinstance(value_node, yaml.ScalarNode) \
                    and value_node.tag == "tag:yaml.org,2002:null" and not value_node.value:
                raise _KeyError(None, None, f"key {key!r} has no value: give one, or write null for none",
                                key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _refuse_base_60(node, value):
    """YAML 1.1 reads a number with colons in base 60: ``train.save_every_minutes=1:30`` checkpointed every 90
    minutes, without a word."""
    if ":" in node.value:
        raise _KeyError(None, None, f"{node.value} is a base-60 number to YAML ({value:g}); write the number itself, "
                        "or quote it if it is text", node.start_mark)


def read_config_text(path, label="--config"):
    """The text of the config file ``path``, read once: a pipe (``--config /dev/stdin``) holds it only for the
    first read, so the config, its pretrained defaults' second pass and the error lines all use this text."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{label} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{label} {path}: a directory; give a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label} {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); a YAML file is "
                          "text") from None
    except OSError as exc:
        raise ConfigError(f"{label} {path}: cannot be read ({exc.strerror or exc})") from None


def load_config(path=None, overrides=(), *, label="--config", check_read=True, text=None):
    """A ``Config`` from an optional YAML file and ``section.key=value`` overrides (applied in order).

    With a pretrained ``model.path``, ``pact_fast.models.pretrained_defaults()`` replace the built-in tiny
    model's defaults (its lr wrecks a pretrained model); the file and the overrides still win. ``label`` names
    the file in errors (a run's own config.yaml is not a --config the user gave). ``check_read``: refuse an
    option the rest of the config leaves unread (``check_unread``); a run's own config.yaml is never checked
    again (it was when the run began; compare sets loss.mode itself), nor is a config that ``--resume`` or
    ``compare`` checks their own way. ``text``: the file's text when the caller read it already
    (``read_config_text``); the file is read once either way."""
    if path and text is None:
        text = read_config_text(path, label)
    try:
        config = _load(path, overrides, label=label, text=text)
        if config.model.path:
            config = _load(path, overrides, base=_pretrained_defaults(), label=label, text=text)
        if check_read and label != RUN_CONFIG:
            check_unread(config)
    except ConfigError as exc:
        raise _at_line(exc, path, text, overrides, label) from None
    return config


def _at_line(exc, path, text, overrides, label):
    """``exc`` (a ``ConfigError``) about an option that the config file ``path`` (its ``text``) sets and no
    override does, as one that names the file's line: ``--config run.yaml:3: train.steps=0 must be >= 1``; else
    ``exc``."""
    set_by_override = [item.split("=", 1)[0].strip() for item in overrides]
    if not path or exc.key is None or any(exc.key == k or exc.key.startswith(k + ".") for k in set_by_override):
        return exc
    line = _line_of(text, exc.key)
    return ConfigError(f"{label} {path}{line}: {exc}", key=exc.key) if line else exc


def _line_of(text, key):
    """``":N"``: the line of a config file's ``text`` (valid YAML) that sets ``key`` (``section.key``); "" where
    none does (no key, or one set through a YAML merge key ``<<``)."""
    if key is None:
        return ""
    line = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader)).get(key)
    return "" if line is None else f":{line}"


def _key_lines(node, prefix=""):
    """``{"section.key": line}`` (1-based) of every key of the YAML mapping ``node``, nested sections' keys too."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, f"{key}."))
    return lines


def defaults_for(config):
    """The defaults ``config`` starts from: the built-in model's, or with a pretrained ``model.path`` those
    ``load_config`` puts in their place."""
    return _load(None, (), base=_pretrained_defaults() if config.model.path else None)


def _pretrained_defaults():
    from .models import pretrained_defaults

    return pretrained_defaults()


_SHAPE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
_BUILTIN_TASKS = ("train_tasks", "world_seed", "hops", "ops", "distractors")
_RL = ("adv_eps", "norm_adv_by_std", "clip_eps_low", "clip_eps_high", "dual_clip", "loss_agg", "loss_scale_factor",
       "beta_kl", "kl_estimator", "kl_ratio_weighted", "c_ent")
_ANCHORING = ("ctx_den", "anchor_mode", "anchor_q", "seed")  # the trace-conditioned term and its anchoring
_SFT_WEIGHTS = ("sft_reasoning_mode", "w_reason", "w_other", "beta_0", "beta_1", "s_end")  # PACT's annealed SFT


def unread_options(config):
    """``{"section.key": why}``: the options this config's other options leave unread."""
    loss, mode, data = config.loss, config.loss.mode, config.data
    out = {}

    def add(reason, *keys):
        out.update(dict.fromkeys(keys, reason))

    if config.model.path:
        add("with model.path the built-in model's shape options are not read", *(f"model.{k}" for k in _SHAPE))
    else:  # model_setup.fit_chat_template: the built-in tokenizer's template is the built-in format
        add("the built-in model's tokenizer has its own tool template (the option is a pretrained model.path's)",
            "model.chat_template")
    if not config.train.wandb:
        add("train.wandb=false: nothing logs to wandb", "train.wandb_project")
    if data.path:
        add("with data.path the built-in tasks' options are not read", *(f"data.{k}" for k in _BUILTIN_TASKS))
        if data.eval_path:
            add("with data.eval_path the held-out rows are that file's, not a split", "data.eval_tasks")
    by_mode = {"sft": _RL + _ANCHORING + _SFT_WEIGHTS + ("switch_progress",),
               "grpo": ("lambda_sft",) + _ANCHORING + _SFT_WEIGHTS + ("switch_progress",),
               "sft_then_grpo": _ANCHORING + _SFT_WEIGHTS, "pact": ("switch_progress",)}[mode]
    add(f"loss.mode={mode} does not read it", *(f"loss.{k}" for k in by_mode))
    if mode == "pact" and loss.lambda_sft == 0:
        add("loss.lambda_sft=0: there is no SFT term to weigh", *(f"loss.{k}" for k in _SFT_WEIGHTS))
    if mode != "sft":
        if loss.loss_agg != "seq-mean-token-sum-norm":
            add(f"loss.loss_agg={loss.loss_agg} does not read it (seq-mean-token-sum-norm does)",
                "loss.loss_scale_factor")
        if loss.beta_kl == 0:
            add("loss.beta_kl=0: there is no KL term", "loss.kl_estimator", "loss.kl_ratio_weighted")
        if not loss.norm_adv_by_std:
            add("loss.norm_adv_by_std=false: the advantages are not divided by a std", "loss.adv_eps")
        if mode == "pact" and (loss.anchor_mode == "mix" or loss.anchor_q in (0.0, 1.0)):
            add(f"loss.anchor_mode={loss.anchor_mode} with anchor_q={loss.anchor_q:g} draws no anchors", "loss.seed")
    return out


def check_unread(config, reference=None, modes=None):
    """Refuse (``ConfigError``, one line) an option set away from ``reference`` that the rest of ``config`` leaves
    unread: it would run as if it had not been given. ``reference``: what the options were before the user set
    them (default: the defaults ``config`` starts from; ``--resume``: the run's own config). ``modes``: the loss
    modes the config will train under (``compare``): an option is refused only when none of them reads it."""
    if reference is None:
        reference = defaults_for(config)
    modes = tuple(modes or (config.loss.mode,))
    unread = [unread_options(dataclasses.replace(config, loss=dataclasses.replace(config.loss, mode=m))) for m in modes]
    for key, reason in unread[0].items():
        if not all(key in u for u in unread):
            continue
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value != getattr(getattr(reference, section), name):
            if len(modes) > 1 and key.startswith("loss."):
                reason = f"none of the modes {', '.join(modes)} reads it"
            raise ConfigError(f"{key}={_show(value)}: {reason}, so it would change nothing; leave it out", key=key)


def check_modes(config, modes):
    """``config`` about to train under each of ``modes`` (``compare``): every mode's values checked (e.g. an SFT
    mode with loss.lambda_sft=0 is refused), and an option none of them reads refused (``check_unread``)."""
    for mode in modes:
        _check_values(dataclasses.replace(config, loss=dataclasses.replace(config.loss, mode=mode)))
    check_unread(config, modes=modes)


def _show(value):
    return list(value) if isinstance(value, tuple) else value


def _load(path, overrides, base=None, label="--config", text=None):
    """A ``Config``: ``base`` (defaults), then the file ``path`` (its ``text``, ``read_config_text``), then the
    overrides."""
    config = Config()
    for key, value in (base or {}).items():
        section, name = key.split(".")
        _set(getattr(config, section), name, value, key)
    if path:
        try:
            stream = io.StringIO(text)
            stream.name = str(path)  # (YAML's errors name the file, not "<unicode string>")
            data = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
        except _KeyError as exc:
            raise ConfigError(f"{label} {path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{label} {path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections {[f.name for f in dataclasses.fields(Config)]}")
        try:
            for section, values in data.items():
                _set(config, section, values, section)
        except ConfigError as exc:  # the file's own value, whatever the overrides set later
            raise ConfigError(f"{label} {path}{_line_of(text, exc.key)}: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        obj = config
        for depth, part in enumerate(parts[:-1]):
            if not hasattr(obj, part) or not dataclasses.is_dataclass(getattr(obj, part)):
                valid = [f.name for f in dataclasses.fields(obj)]
                raise ConfigError(f"unknown section {'.'.join(parts[:depth + 1])!r}; valid: {', '.join(valid)}")
            obj = getattr(obj, part)
        if len(parts) == 1:
            raise ConfigError(f"override {item!r} must name a section and a key, e.g. train.steps=10")
        _set(obj, parts[-1], _override_value(obj, parts[-1], raw, key.strip()), key.strip())
    _expand_home(config)
    _check_values(config)  # first, so that a bound BOUNDS holds is named by its key (loss.c_ent, not PACTLossConfig)
    _rebuild(config)
    return config


MAX_SEED = 2 ** 32 - 1  # the largest seed option
MIN_TEMPERATURE = 1e-4  # the lowest rollout.temperature (rollout.greedy=true samples the argmax)

# Bounds of numeric options, checked after the file and the overrides (None: unbounded; "open": the bound itself
# is refused). Every float option must also be finite.
BOUNDS = {
    "train.steps": (1, None), "train.prompts_per_step": (1, None), "train.update_epochs": (1, None),
    "train.micro_batch_tokens": (1, None), "train.lr": ((0, "open"), None), "train.min_lr_ratio": (0, 1),
    "train.warmup_steps": (0, None), "train.weight_decay": (0, None), "train.grad_clip": (0, None),
    "train.stop_after": (0, None), "train.save_every": (0, None), "train.save_every_minutes": (0, None),
    "train.keep_last": (1, None), "train.eval_every": (0, None),
    "data.train_tasks": (1, None), "data.eval_tasks": (1, None), "data.distractors": (0, None),
    "rollout.group_size": (1, None), "rollout.max_new_tokens": (1, None), "rollout.max_turns": (1, None),
    # the logits are divided by the temperature: at 1e-20 every step's gradient was not finite (skipped), at 1e-45
    # sampling failed (a traceback); 1e-8 trained
    "rollout.temperature": (MIN_TEMPERATURE, None), "rollout.top_p": ((0, "open"), 1),
    # a group of equal rewards has std 0: (R - mean) / (0 + 0) was NaN, a traceback in the first step's loss
    "loss.adv_eps": ((0, "open"), None), "loss.clip_eps_low": (0, (1, "open")), "loss.clip_eps_high": (0, None),
    "loss.lambda_sft": (0, None), "loss.w_reason": (0, None), "loss.w_other": (0, None), "loss.beta_0": (0, None),
    "loss.beta_1": (0, None), "loss.beta_kl": (0, None), "loss.c_ent": (0, None), "loss.switch_progress": (0, 1),
    "loss.loss_scale_factor": (1, None), "rollout.call_timeout": ((0, "open"), None), "rollout.max_call_chars": (1, None),
    "rollout.max_result_chars": (1, None), "rollout.max_calls_per_turn": (1, None), "data.format_reward": (0, None),
    "model.hidden_size": (1, None),
    "model.num_layers": (1, None), "model.num_heads": (1, None), "model.num_kv_heads": (1, None),
    "model.head_dim": (1, None), "model.intermediate_size": (1, None),
    # seeds: torch's generators take 64-bit seeds, and the trainer derives per-step and per-epoch ones from these
    # (train.seed * 1_000_003 + ..., data.seed * 7919 + epoch); a larger seed failed mid-run with an overflow
    **dict.fromkeys(("train.seed", "data.seed", "loss.seed", "data.world_seed"), (0, MAX_SEED)),
}


def _check_values(config):
    """Every float option finite, every option of BOUNDS within its bounds, the built-in hop counts known."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number", key=key)
            if key in BOUNDS and value is not None:
                for bound, below in zip(BOUNDS[key], (True, False)):
                    limit, is_open = bound if isinstance(bound, tuple) else (bound, False)
                    if limit is None:
                        continue
                    bad = (value <= limit if is_open else value < limit) if below else \
                        (value >= limit if is_open else value > limit)
                    if bad:
                        relation = (">" if is_open else ">=") if below else ("<" if is_open else "<=")
                        raise ConfigError(f"{key}={value} must be {relation} {limit}", key=key)
    if config.data.format_reward >= 1:  # evaluation.episode_metrics: success is reward >= 1
        raise ConfigError(f"data.format_reward={config.data.format_reward} must be < 1: an episode of reward >= 1 "
                          "counts as a success, and a wrong answer with clean tool calls would count as one")
    if config.loss.mode in ("sft", "sft_then_grpo") and config.loss.lambda_sft == 0:
        phase = "" if config.loss.mode == "sft" else " before loss.switch_progress"
        raise ConfigError(f"loss.mode={config.loss.mode} with loss.lambda_sft=0: the SFT term is the only loss"
                          f"{phase}, and it would be 0 (every step trains nothing)")
    m = config.model
    if not m.path and m.num_heads % m.num_kv_heads:  # else an error from packed scoring's check, after the model load
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads} "
                          "(each key/value head serves a group of query heads)")
    if not m.path and m.head_dim % 2:  # else a traceback from the rotary embedding
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (the rotary embedding rotates pairs)")
    if not config.train.out_dir.strip():  # "" would write the run into the working directory
        raise ConfigError("train.out_dir is empty; give the run a directory")
    from .envs.multihop import CHAINS

    if config.data.eval_path and not config.data.path:
        raise ConfigError(f"data.eval_path={config.data.eval_path} needs data.path: the built-in tasks hold out their "
                          "own (data.eval_tasks of another world)")
    if config.data.env_modules and not config.data.path:
        raise ConfigError(f"data.env_modules={list(config.data.env_modules)} needs data.path: the built-in tasks run in "
                          "the built-in environment")
    bad = [m for m in config.data.env_modules if not all(p.isidentifier() for p in m.split("."))]
    if bad:
        raise ConfigError(f"data.env_modules: {bad[0]!r} is not a module name (e.g. my_envs or my_pkg.envs)")
    if not config.data.hops or any(h not in CHAINS for h in config.data.hops):
        raise ConfigError(f"data.hops={list(config.data.hops)} must be a non-empty list of hop counts from "
                          f"{sorted(CHAINS)}")


# the files and directories a run reads: a relative one is relative to the directory the command runs in
PATH_OPTIONS = ("model.path", "model.lora.adapter", "data.path", "data.eval_path")


def _expand_home(config):
    """``~`` and ``~user`` at the start of the paths a run reads or writes (``PATH_OPTIONS``, ``train.out_dir``)
    expanded, in place: neither a YAML file nor an override such as ``train.out_dir=~/runs/x`` (not a word the shell
    expands) does it, so the run went to a directory named ``~`` under the working one, and ``model.path=~/m``
    was "does not exist"."""
    for key in PATH_OPTIONS + ("train.out_dir",):
        *sections, name = key.split(".")
        holder = config
        for section in sections:
            holder = getattr(holder, section)
        value = getattr(holder, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(holder, name, os.path.expanduser(value))


def _absolute_paths(data):
    """``data`` (``plain`` of a config) with each set ``PATH_OPTIONS`` made absolute from here, in place."""
    for key in PATH_OPTIONS:
        *sections, name = key.split(".")
        holder = data
        for section in sections:
            holder = holder[section]
        if holder[name]:
            holder[name] = os.path.abspath(holder[name])
    return data


def save_config(config, path, *, keep_as=None):
    """Write the resolved config as YAML: one-off options (``train.stop_after``) at their defaults, so a later
    ``--resume`` does not repeat them, and the paths a run reads (``PATH_OPTIONS``) absolute, so ``eval --run`` and
    ``--resume`` find them from any directory (a run started with ``--data tasks.jsonl`` saved it as typed).
    ``keep_as``: a file name beside ``path`` for the config already there when it holds other values (a resume with
    changed options: what the earlier steps trained with stays in the run directory); a file of that name is kept."""
    data = _absolute_paths(plain(config))
    for section, key, default in one_off_fields():
        data[section][key] = default
    path = Path(path)
    if keep_as and path.is_file() and not (path.parent / keep_as).exists():
        if yaml.safe_load(path.read_text()) != data:
            os.replace(path, path.parent / keep_as)
    write_text(path, yaml.safe_dump(data, sort_keys=False))  # whole or not at all: never a cut config.yaml


def one_off_fields():
    for sf in dataclasses.fields(Config):
        section = sf.default_factory()
        for f in dataclasses.fields(section):
            if f.metadata.get("one_off"):
                yield sf.name, f.name, getattr(section, f.name)


def config_changes(old, new):
    """``[(key, old value, new value)]`` for every option that differs between two configs; paths
    (``PATH_OPTIONS``) as absolute ones, so a run's config.yaml (``save_config``) and the relative path that started
    it agree."""
    a, b = _absolute_paths(plain(old)), _absolute_paths(plain(new))
    return [(f"{s}.{k}", a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]]


def plain(x, *, finite=False):
    """``x`` as plain data for YAML or JSON: objects (dataclasses, configs) as dicts of their fields, tuples as
    lists, dict keys as strings; with ``finite``, non-finite floats as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): plain(v, finite=finite) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v, finite=finite) for v in x]
    if hasattr(x, "__dict__") and not isinstance(x, (int, float, str)):
        return plain(x.__dict__, finite=finite)
    if finite and isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def describe(config=None, prefix=""):
    """Lines of ``key = value  help`` for every field of ``config`` (default: ``Config()``, the values a run
    without a file or overrides uses), for ``pact-fast config``."""
    config = Config() if config is None else config
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}  {f.metadata.get('help', '')}")
    return lines
