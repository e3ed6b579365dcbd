"""Environments of your own: a row's ``env.name`` of the form ``"package.module:ClassName"`` names a ``ToolEnv``
subclass that pact_fast imports (from ``sys.path``: install the package, or put its directory on ``PYTHONPATH``)
and builds for every episode of that row, from a copy of the row's dicts and lists (what the class changes in
``example``, such as a list of later user turns it pops, stays in that episode). The run's config must allow the
module (``data.env_modules``): a data file alone never makes pact_fast import code::

    from pact_fast.envs.base import ToolEnv
    from pact_fast.envs.multihop import final_answer

    class WeatherEnv(ToolEnv):
        def __init__(self, example, **caps):  # caps: max_turns, max_call_chars, max_result_chars, ...
            super().__init__(**caps)
            self.city = example.env["city"]  # anything the row's "env" object carries

        def run_call(self, name, arguments):  # -> (response text, ran without error)
            if name != "forecast":
                return f"error : unknown tool {name}", False
            return "sunny", True

        def reward(self, final_text):  # -> a finite number; success counts reward >= 1
            # final_text: the last turn as the model wrote it, <think> reasoning included: "sunny?" in the reasoning
            # would pay a wrong answer
            return float("sunny" in final_answer(final_text).lower())

        @staticmethod
        def check_example(example):  # optional: why a row cannot train here (one line), or None
            return None if "city" in example.env else "env needs a 'city'"

The environment runs in the trainer's process, one episode after another, with no time limit of pact_fast's
(``BFCLEnv`` has its worker process for that): a call that may hang must bound its own time.
``run_call`` answers what the model may get wrong (an unknown tool, bad arguments) as an error response. An
exception (``SystemExit`` too: a command-line tool's ``main()``) from the class's code (its constructor,
``run_call``, ``reward``, ``next_user_turn``, ``close``, an override of ``step``), a constructor that does not hand
the caps to ``ToolEnv``, a reward that is not a finite number, a response or user turn that is not text (``step``:
one per call), a blank user turn (None ends the episode), and a flag that is not ``True`` or ``False`` stop the run
with a ``ToolEnvError`` naming the class. ``next_user_turn`` (multi-turn tasks: a later user turn in the trace
counts towards the turns an episode needs) and ``close`` (release what an episode holds) are ``ToolEnv``'s to
override too. The class (``resolve``) and every row (``check_example``) are checked when the data loads, before any
model does: a class that cannot serve is refused whatever ``data.on_error`` says; a row its ``check_example``
refuses is skipped with ``data.on_error=skip``.
"""
import copy
import dataclasses
import importlib
import inspect
import math
import numbers
import sys
from functools import lru_cache

from ..data import DataSetupError
from .base import ToolEnv, ToolEnvError, excerpt_of

CAPS = ("max_turns", "max_call_chars", "max_result_chars", "max_calls_per_turn")  # what the constructor is given


def is_plugin(name):
    """Whether env name ``name`` names an environment of the user's own (``"module:Class"``)."""
    return isinstance(name, str) and ":" in name


def _allowed(module_name, env_modules):
    return any(module_name == m or module_name.startswith(m + ".") for m in env_modules)


@lru_cache(maxsize=None)
def _resolve(name, env_modules):
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or not module_name.replace(".", "").replace("_", "").isalnum():
        return None, f"env name {name!r}: expected 'package.module:ClassName'"
    if not _allowed(module_name, env_modules):
        return None, (f"env name {name!r}: module {module_name} is not in data.env_modules "
                      f"({', '.join(env_modules) or 'empty'}); a data file never imports code by itself: "
                      f"data.env_modules=[{module_name}] allows it")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # a script's top level (argparse, sys.exit) ended pact-fast with its status, 0 too
        return None, (f"env name {name!r}: importing {module_name} exits (SystemExit: {exc.code}): its top-level code "
                      "runs on import; put a script's own start under `if __name__ == '__main__':`")
    except Exception as exc:  # the user's module may raise anything while it imports
        path = ", ".join(sys.path[:3])
        return None, (f"env name {name!r}: cannot import {module_name} ({type(exc).__name__}: "
                      f"{excerpt_of(exc, 200)}); is its directory on PYTHONPATH? (sys.path starts {path})")
    cls = getattr(module, attr, None)
    if cls is None:
        return None, f"env name {name!r}: {module_name} has no {attr!r}"
    if not (inspect.isclass(cls) and issubclass(cls, ToolEnv)):
        return None, (f"env name {name!r}: {attr} is not a subclass of pact_fast.envs.base.ToolEnv (which checks the "
                      "calls, counts turns and errors, and caps responses)")
    missing = [m for m in ("run_call", "reward") if getattr(cls, m, None) is getattr(ToolEnv, m, None)]
    if missing:
        return None, f"env name {name!r}: {attr} does not implement {' and '.join(missing)}"
    try:
        inspect.signature(cls).bind(None, **{k: None for k in CAPS})
    except TypeError:
        return None, (f"env name {name!r}: {attr}(example, {', '.join(f'{k}=...' for k in CAPS)}) does not fit its "
                      f"__init__{inspect.signature(cls)}: take (example, **caps) and pass caps to ToolEnv.__init__")
    check = inspect.getattr_static(cls, "check_example", None)
    if check is not None and not isinstance(check, (staticmethod, classmethod)):
        return None, (f"env name {name!r}: {attr}.check_example must be a staticmethod (or classmethod) taking the "
                      "example: it runs on every row before any environment is built")
    return cls, None


def resolve(name, env_modules):
    """``(ToolEnv subclass, None)`` for env name ``name``, or ``(None, one-line reason)``: a module outside
    ``env_modules`` (``data.env_modules``: modules and the packages whose modules may be imported), not importable (or
    exiting as it imports: a script's top-level argparse), no such attribute, not a ``ToolEnv`` subclass, ``run_call``
    or ``reward`` not implemented, a constructor that does not take ``(example, **caps)``. Imported once per name."""
    return _resolve(name, tuple(env_modules))


def check_example(example, env_modules):
    """Why ``example`` cannot train in its environment of the user's own (one line), or None: its class's optional
    ``check_example(example)`` says why (or raised). A class that does not resolve (``resolve``) is a
    ``DataSetupError``: the same for every row, never skipped."""
    cls, reason = resolve(example.env["name"], env_modules)
    if reason:
        raise DataSetupError(reason)
    check = getattr(cls, "check_example", None)
    if check is None:
        return None
    try:
        reason = check(example)
    except (Exception, SystemExit) as exc:  # the user's check may raise anything on a row it does not expect
        return f"{cls.__name__}.check_example raised {type(exc).__name__}: {excerpt_of(exc)}"
    if reason is not None and not isinstance(reason, str):
        return f"{cls.__name__}.check_example returned {reason!r}: expected None or a reason (a string)"
    return reason


def _copied(value):
    """``value`` with its dicts and lists copied; other objects shared (a client that a row built in Python carries,
    which ``copy.deepcopy`` may not copy at all)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


def _own_copy(example):
    """``example`` for one episode's environment: its fields ``_copied``."""
    own = copy.copy(example)
    for f in dataclasses.fields(example):
        setattr(own, f.name, _copied(getattr(example, f.name)))
    return own


def make_env(example, caps, env_modules):
    """The environment of one episode of ``example``: its class built with ``caps`` (``CAPS``, which it must hand
    to ``ToolEnv``) on ``_own_copy(example)`` (the row's other episodes and later steps never see what it changes).
    Raises ``ToolEnvError`` when the constructor raises or drops a cap."""
    cls, reason = resolve(example.env["name"], env_modules)
    if reason:
        raise DataSetupError(reason)
    try:
        env = cls(_own_copy(example), **caps)
    except (Exception, SystemExit) as exc:
        raise ToolEnvError(f"{cls.__name__}(example {example.id}) raised {type(exc).__name__}: {excerpt_of(exc)} (a "
                           "check of the row belongs in its check_example, which runs when the data loads)") from exc
    for key in CAPS[1:]:  # max_turns: the rollout takes the smaller of the env's and the config's
        if getattr(env, key, None) != caps[key]:
            raise ToolEnvError(f"{cls.__name__}.__init__ did not hand {key}={caps[key]} to ToolEnv.__init__ (the "
                               f"environment has {getattr(env, key, None)}): pass **caps on")
    turns = getattr(env, "max_turns", None)
    # a whole number (numpy's too), or math.inf: no limit of its own (the config's holds)
    whole = (isinstance(turns, numbers.Integral) and not isinstance(turns, bool)) or turns == math.inf
    if not whole or turns < 1:
        raise ToolEnvError(f"{cls.__name__}(example {example.id}) has max_turns={turns!r}: expected a whole number "
                           f">= 1 (its own turn limit, or the max_turns={caps['max_turns']} it was given) or math.inf")
    return env
