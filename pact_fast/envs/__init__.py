"""Environments: the built-in multi-hop tool environment and its tokenizer."""
from .multihop import make_task, make_tasks
from .tokenizer import build_tokenizer

__all__ = ["make_task", "make_tasks", "build_tokenizer"]
