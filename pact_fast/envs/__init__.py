"""Environments: the built-in multi-hop tool environment and its tokenizer, and the factory that gives each
example its environment (multihop, BFCL, or one of the user's own: ``plugin``)."""
from . import plugin
from .multihop import make_task, make_tasks
from .tokenizer import build_tokenizer


def make_env_factory(cfg, rollout_cfg):
    """example -> its environment, with the turn limit and the tool-call limits of ``rollout_cfg``."""
    from .multihop import MultiHopEnv

    caps = {key: getattr(rollout_cfg, key) for key in plugin.CAPS}  # max_turns and ToolEnv's size caps

    def make_env(example):
        name = (example.env or {}).get("name", "multihop")
        if name == "bfcl":
            from .bfcl import BFCLEnv

            return BFCLEnv(example, call_timeout=rollout_cfg.call_timeout, **caps)
        if plugin.is_plugin(name):
            return plugin.make_env(example, caps, cfg.env_modules)
        if name != "multihop":
            from ..data import ENVIRONMENTS

            raise ValueError(f"example {example.id}: unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
        return MultiHopEnv(example, format_reward=cfg.format_reward, **caps)

    return make_env


def check_example(example, env_modules=()):
    """Why ``example`` cannot train in its environment (``env.name``; a one-line reason), or None:
    ``multihop.check_example`` (its own tools, a text answer, a trace that replays to reward 1),
    ``bfcl.check_example`` (the fields ``BFCLEnv`` reads, a trace that replays to reward 1) or
    ``plugin.check_example`` (the class resolves from ``env_modules``, ``data.env_modules``, and its own
    ``check_example`` passes)."""
    name = (example.env or {}).get("name")
    if plugin.is_plugin(name):
        return plugin.check_example(example, env_modules)
    if name == "bfcl":
        from .bfcl import check_example as check
    else:
        from .multihop import check_example as check
    return check(example)


def min_turns(example):
    """The fewest assistant turns an episode of ``example`` needs to be rewarded: one per user turn (a BFCL task's
    first query and each later one; elsewhere the prompt's and each later one in the trace: a multi-hop task has
    one), and one more for each user turn whose expert trace calls tools (calls get their results in the next
    turn; a turn without calls ends the user turn)."""
    env = example.env or {}
    if env.get("name") == "bfcl":
        queries = 1 + len(env.get("user_turns", ()))
    else:
        queries = 1 + sum(m["role"] == "user" for m in example.trace or ())
    calling, current = 0, False  # user turns of the trace with calls; whether the current one has any
    for message in example.trace or ():
        if message["role"] == "user":
            calling, current = calling + current, False
        elif message["role"] == "assistant" and message.get("tool_calls"):
            current = True
    return queries + calling + current


__all__ = ["make_task", "make_tasks", "build_tokenizer", "make_env_factory", "check_example", "min_turns"]
