"""Held-out evaluation: greedy, prompt-only episodes on held-out tasks.

``evaluate`` is what a training run logs as ``eval/*``; ``evaluate_model`` is ``pact-fast eval``: the same
evaluation of a model directory, or of a run's latest checkpoint under the run's own config (a LoRA run's
adapters on its base model), with the first episodes shown as text (what the model wrote, the tool responses it
got, the expected answer).

    pact-fast eval --run runs/pact --show 2
    pact-fast eval --model ~/.cache/pact_fast/models/smollm2-135m 'data.hops=[1,2]'
"""
from pathlib import Path

import yaml

from . import checkpoint
from .config import RUN_CONFIG, ConfigError, check_unread, load_config


def episode_metrics(episodes):
    """Success rate (reward >= 1), mean reward and sampled tokens per episode, and what shows progress before
    success does: the fraction of episodes that end with an answer (not a turn or length limit) and tool calls
    per episode. ``episodes``: a list of ``rollout.Episode``."""
    n = max(len(episodes), 1)
    return {"success_rate": sum(e.reward >= 1.0 for e in episodes) / n,
            "mean_reward": sum(e.reward for e in episodes) / n,
            "tokens_per_episode": sum(e.num_model_tokens for e in episodes) / n,
            "answer_rate": sum(e.finish == "answer" for e in episodes) / n,
            "tool_calls_per_episode": sum(e.tool_calls for e in episodes) / n}


def evaluate(engine, examples, make_env, *, return_episodes=False):
    """``episode_metrics`` of one greedy prompt-only episode per example through ``engine`` (any
    ``RolloutEngine``); with ``return_episodes``, ``(metrics, episodes)``."""
    episodes = [g[0] for g in engine.rollout(examples, make_env, group_size=1, greedy=True)]
    metrics = episode_metrics(episodes)
    return (metrics, episodes) if return_episodes else metrics


def format_episode(tokenizer, example, episode):
    """One episode as text: the question, everything after the prompt (the model's turns and the tool
    responses, special tokens kept), and how it ended against the expected answer."""
    question = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
    return "\n".join([f"=== {example.id}: {question}",
                      tokenizer.decode(episode.response_ids, skip_special_tokens=False),
                      f"--- finish: {episode.finish or '-'}  answer: {episode.final_text.strip()!r}  "
                      f"expected: {example.answer!r}  reward: {episode.reward:g}"])


MODEL_SHAPE = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim",
               "model.intermediate_size")  # the built-in model's shape options


def override_keys(item):
    """The keys an override ``key=value`` may set: ``key``, and for a value that reads as a mapping (a section
    given whole: ``model.lora={enabled: true, dropout: 0.5}``) each key inside it too (``model.lora.enabled``,
    ``model.lora.dropout``), so that a check by key sees them (a string option takes the text as it is)."""
    key, _, raw = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # load_config says what is wrong with it
        return [key]

    def keys(prefix, value):
        return [prefix] + [k for name, v in (value.items() if isinstance(value, dict) else ())
                           for k in keys(f"{prefix}.{name}", v)]

    return keys(key, value)


def fixed_override(overrides, fixed):
    """The first key set by ``overrides`` (``key=value`` strings; a section's mapping sets each key in it) that
    ``fixed`` names (a key, or a prefix ending in "."), or None."""
    for item in overrides:
        for key in override_keys(item):
            if any(key == f or (f.endswith(".") and key.startswith(f)) for f in fixed):
                return key
    return None


# What an evaluation reads: model.*, data.* and rollout.* but the options of training alone (sampling for training:
# one greedy episode per task; which weights train; the training tasks, which the held-out ones do not depend on),
# and of train.* the device, threads, seed and the episode length cap
EVAL_UNREAD = ("rollout.group_size", "rollout.temperature", "rollout.top_p", "rollout.greedy", "rollout.is_cap",
               "model.freeze_lm_head", "data.train_tasks")
EVAL_READ_TRAIN = ("train.device", "train.threads", "train.seed", "train.micro_batch_tokens")


def check_eval_overrides(overrides, config):
    """A one-line ``ConfigError`` for the first of ``overrides`` (``key=value`` strings) that the evaluation of
    ``config`` does not read (a loss, optimizer or scoring option, a sampling option, ``data.seed`` with a data file:
    it orders the training rows alone): it would change nothing."""
    unread = EVAL_UNREAD + (("data.seed",) if config.data.path else ())
    for key in (k for item in overrides for k in override_keys(item)):
        if key in unread or not (key.startswith(("model.", "data.", "rollout.")) or key in EVAL_READ_TRAIN):
            raise ConfigError(f"{key}: the evaluation does not read it (one greedy episode per held-out task; of "
                              f"train.* it reads {', '.join(k[6:] for k in EVAL_READ_TRAIN)}), so it would change "
                              "nothing; leave it out")


def run_config(run, overrides=()):
    """``(config, checkpoint_dir)`` for evaluating a run: the run's ``config.yaml`` with its latest checkpoint
    (``run`` may also be a checkpoint directory itself) as ``model.path``, or, for a LoRA run, as
    ``model.lora.adapter`` on the run's base model; then ``overrides``."""
    ckpt, run_cfg = checkpoint.latest_with_config(run)
    saved = load_config(str(run_cfg), label=RUN_CONFIG)
    # what makes the model is the run's: another shape, path or adapter would evaluate something else (the built-in
    # base under LoRA is drawn from train.seed)
    lora = saved.model.lora.enabled
    # a LoRA run's model.path is its base's directory, which may have moved (another machine): that one may be given
    fixed = (["model.path"] if not (lora and saved.model.path) else []) + list(MODEL_SHAPE) + \
        (["model.lora."] if lora else []) + \
        (["train.seed"] if lora and saved.model.path is None else [])
    key = fixed_override(overrides, fixed)
    if key:
        raise ConfigError(f"--run {run}: {key} is the run's own (it makes the model the checkpoint belongs to); "
                          "it cannot be overridden")
    key = "model.lora.adapter" if lora else "model.path"
    config = load_config(str(run_cfg), [f"{key}={ckpt}", *overrides], label=RUN_CONFIG)
    check_run_paths(config, run_cfg, overrides)
    check_unread(config, reference=saved)  # data.hops=[2] for a run on a data file evaluated its rows as they were
    check_split(config, saved)
    return config, ckpt


def check_split(config, saved):
    """A one-line ``ConfigError`` when ``config`` (``eval --run`` of the run of config ``saved``) splits more held-out
    rows off the run's data file than the run did: the run held out the file's first rows and trained on the rest,
    so the extra ones are rows it trained on (``data.eval_tasks=8`` of a run that held out 2 scored 6 of them)."""
    from .data import load_data

    data, run_data = config.data, saved.data
    if not data.path or data.eval_path or data.path != run_data.path or data.eval_tasks <= run_data.eval_tasks:
        return
    train_rows, held_out = load_data(run_data, needs_trace=False, log=None)
    n = min(data.eval_tasks, (len(train_rows) + len(held_out)) // 5)  # (load_data's split)
    if n > len(held_out):
        raise ConfigError(f"data.eval_tasks={data.eval_tasks} holds out the first {n} rows of {data.path}, but the run "
                          f"held out its first {len(held_out)} and trained on the rest: the metrics would include "
                          f"tasks it trained on; give at most {len(held_out)}, or held-out tasks of their own with "
                          "data.eval_path=FILE")


def check_run_paths(config, run_cfg, overrides):
    """A one-line ``ConfigError`` when a relative model.path, data.path or data.eval_path of the run's config
    (``run_cfg``, not set by ``overrides``) is not found from here: it is relative to where the run was started."""
    for key in ("model.path", "data.path", "data.eval_path"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        given = fixed_override(overrides, [key])
        if value and not given and not Path(value).is_absolute() and not Path(value).exists():
            raise ConfigError(f"{run_cfg}: {key}={value} is relative to the directory the run was started in and "
                              f"is not found from here: run from there (eval and --resume also take {key}=PATH)")


# overrides of `pact-fast eval --run` that choose other held-out rows than the run's on purpose
HELD_OUT_CHOICE = ("data.eval_path", "data.eval_tasks")


def check_same_held_out(ckpt, held_out):
    """A one-line ``DataFormatError`` when ``held_out`` (``Example`` items, checked as the trainer checks them) are
    not the rows the run of checkpoint ``ckpt`` held out (its ``DataOrder.held_out``): its data file changed since,
    and the metrics would be of other tasks, possibly ones it trained on."""
    from .data import DataFormatError, ids_fingerprint

    saved = checkpoint.held_out_fingerprint(ckpt)
    if saved is not None and saved != ids_fingerprint(held_out):
        raise DataFormatError(f"--run: the run of {ckpt} held out other rows than the {len(held_out)} its config's "
                              "data gives now (the data file changed since, or, with data.on_error=skip, an override "
                              "leaves out other rows): the metrics would be of other tasks, possibly ones it trained "
                              "on; evaluate with the run's data and options, or choose held-out tasks with "
                              "data.eval_path=FILE")


def evaluate_model(config, *, show=0, log=print, held_out_of=None):
    """Load ``config``'s model (``model.path``, else the built-in tiny model at its seed) and data, evaluate it
    on the held-out tasks through the engine ``rollout.engine`` names (on the CPU with ``train.threads``, as the
    trainer), ``log`` the first ``show`` episodes as text; returns ``episode_metrics``. ``held_out_of``: a
    checkpoint whose run's held-out rows these must be (``check_same_held_out``)."""
    from .cpu import fit_threads
    from .data import load_data
    from .envs import make_env_factory
    from .model_setup import build_policy, fit_chat_template, resolve_device
    from .rollout_vllm import make_rollout_engine
    from .task_inputs import limits, prepare

    train_set, held_out = load_data(config.data, needs_trace=False)  # data errors before the model loads
    if held_out_of is not None and config.data.on_error == "raise":  # prepare keeps every row or raises
        check_same_held_out(held_out_of, held_out)
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        fit_threads(config.train.threads, log=log)
    policy = build_policy(config.model, device, config.train.seed)
    model, tokenizer = policy.model, policy.tokenizer
    fit_chat_template(config, tokenizer, train_set + held_out, log=log)
    # the run's own limits (its engine's): the same held-out rows as its training evaluated
    _, held_out = prepare(tokenizer, [], held_out, limits(model, config), on_error=config.data.on_error, log=log,
                          tool_call_format=config.rollout.tool_call_format)
    if held_out_of is not None and config.data.on_error == "skip":  # which rows are left out needs the model
        check_same_held_out(held_out_of, held_out)
    data = config.data
    source = f"data.eval_path={data.eval_path}" if data.eval_path else \
        f"the first rows of {data.path}" if data.path else "the built-in environment's"
    log(f"[pact_fast] held-out evaluation: {len(held_out)} tasks ({source}), one greedy episode each")
    # the run's own engine, as its evaluations during training sampled
    engine = make_rollout_engine(model, tokenizer, config.rollout, seed=config.train.seed)
    try:
        metrics, episodes = evaluate(engine, held_out, make_env_factory(config.data, config.rollout),
                                     return_episodes=True)
    finally:
        if hasattr(engine, "close"):  # vLLM's engine process
            engine.close()
    for example, episode in list(zip(held_out, episodes))[:show]:
        log(format_episode(tokenizer, example, episode))
    return metrics


__all__ = ["check_eval_overrides", "check_run_paths", "check_same_held_out", "check_split", "episode_metrics", "evaluate",
           "evaluate_model", "fixed_override", "format_episode", "override_keys", "run_config"]
