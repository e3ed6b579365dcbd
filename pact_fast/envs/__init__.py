"""Environments: the built-in multi-hop tool environment and its tokenizer, and the factory that gives each
example its environment (multihop or BFCL)."""
from .multihop import make_task, make_tasks
from .tokenizer import build_tokenizer


def make_env_factory(cfg, rollout_cfg):
    """example -> its environment, with the turn limit and the tool-call limits of ``rollout_cfg``."""
    from .multihop import MultiHopEnv

    caps = dict(max_turns=rollout_cfg.max_turns, max_call_chars=rollout_cfg.max_call_chars,
                max_result_chars=rollout_cfg.max_result_chars)

    def make_env(example):
        name = (example.env or {}).get("name", "multihop")
        if name == "bfcl":
            from .bfcl import BFCLEnv

            return BFCLEnv(example, call_timeout=rollout_cfg.call_timeout, **caps)
        if name != "multihop":
            from ..data import ENVIRONMENTS

            raise ValueError(f"example {example.id}: unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
        return MultiHopEnv(example, format_reward=cfg.format_reward, **caps)

    return make_env


__all__ = ["make_task", "make_tasks", "build_tokenizer", "make_env_factory"]
