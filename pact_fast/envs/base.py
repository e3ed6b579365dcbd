"""What every tool environment shares: turn and error bookkeeping, and size caps, around one-call execution."""
import numpy

from ..toolcalls import MAX_ARGUMENT_DEPTH, MAX_CALL_CHARS, nesting_depth

MAX_RESULT_CHARS = 100_000  # characters of one tool response (BFCL long_context reaches 31,706)
MAX_CALLS_PER_TURN = 16  # calls one assistant turn may make (expert traces: 1 on multi-hop and every BFCL category)
MAX_NAME_CHARS = 100  # characters of a tool name


def argument_chars(value, limit=MAX_CALL_CHARS):
    """Approximate characters of ``value`` written out (strings, numbers, containers), counted without
    recursion and without converting big integers to text; stops counting once it passes ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, dict):
            total += 2
            for k, v in item.items():
                total += 2
                stack += [k, v]
        elif isinstance(item, (list, tuple)):
            total += 2 + len(item)
            stack += list(item)
        elif isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 2  # about log10(2) digits per bit
        else:
            total += 24
    return total


class ToolEnvError(RuntimeError):
    """An environment broke its contract (its code raised, ``run_call`` answered something else than ``(text, ok)``
    with ``ok`` a bool, a reward that is not a finite number): the run stops with this one line, naming the class."""


def unread_env_key(env, name, keys):
    """Why a row's ``env`` cannot go to the environment ``name``, which reads ``keys`` only (a one-line reason), or
    None: another key (a typo of one it reads) would be ignored."""
    unread = [k for k in env if k not in keys]
    if unread:
        return (f"env has {unread[0]!r}, a key env {name!r} does not read (it reads {', '.join(keys)}); rename it or "
                "leave it out")
    return None


def excerpt_of(exc, limit=300):
    """An exception's message on one line, at most ``limit`` characters."""
    return " ".join(str(exc).split())[:limit]


def contract_call(env, method, example_id, *args):
    """``env.<method>(*args)``; an exception it raises is a ``ToolEnvError`` naming the class, the method and the
    example (an environment's own bug, not the model's); a ``ToolEnvError`` (``step``'s, naming ``run_call``) as is."""
    try:
        return getattr(env, method)(*args)
    except ToolEnvError:
        raise
    except (Exception, SystemExit) as exc:  # SystemExit: a CLI's main() ended the run with its status, 0 too
        raise ToolEnvError(f"{type(env).__name__}.{method} raised {type(exc).__name__}: {excerpt_of(exc)} (example "
                           f"{example_id})") from exc


class ToolEnv:
    """Base of the environments the rollout drives.

    Subclasses implement ``run_call(name, arguments) -> (response text, ok)`` and ``reward(final_text)`` (the
    episode's last turn as the model wrote it, its ``<think>`` reasoning included: ``multihop.final_answer`` keeps
    the answer); multi-turn environments also override ``next_user_turn``. ``max_turns`` is the episode's turn limit.

    ``step`` refuses, with an error observation and before ``run_call`` sees them, calls whose name is
    not a short string, whose arguments are not an object, write out to more than ``max_call_chars``
    characters or nest deeper than ``MAX_ARGUMENT_DEPTH``; a response longer than ``max_result_chars``
    is replaced by an error observation too, and so is every call of a turn past its first
    ``max_calls_per_turn`` (a turn of many slow calls would hold its episode for each one's time limit).
    Error observations start with ``error_prefix``.
    """

    error_prefix = "error : "
    malformed_response = "error : bad tool call"

    def __init__(self, max_turns, *, max_call_chars=MAX_CALL_CHARS, max_result_chars=MAX_RESULT_CHARS,
                 max_calls_per_turn=MAX_CALLS_PER_TURN):
        self.max_turns = max_turns
        self.max_call_chars = max_call_chars
        self.max_result_chars = max_result_chars
        self.max_calls_per_turn = max_calls_per_turn
        self.turns = 0
        self.errors = 0

    def run_call(self, name, arguments):
        raise NotImplementedError

    def refusal(self, name, arguments):
        """Why a call is refused before execution (a short text), or None."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            return "bad tool name"
        if not isinstance(arguments, dict):
            return f"arguments of {name} must be an object"
        size = argument_chars(arguments, self.max_call_chars)
        if size > self.max_call_chars:
            return f"arguments of {name} are longer than the limit of {self.max_call_chars} characters"
        if nesting_depth(arguments) > MAX_ARGUMENT_DEPTH:
            return f"arguments of {name} are nested deeper than {MAX_ARGUMENT_DEPTH} levels"
        return None

    def step(self, calls):
        """Execute a turn's calls (``ToolCall`` or ``ToolCallError`` items) -> tool response texts."""
        self.turns += 1
        out = []
        for k, call in enumerate(calls):
            if k >= self.max_calls_per_turn:
                text, ok = (f"{self.error_prefix}not run: more than {self.max_calls_per_turn} tool calls in one "
                            "turn"), False
            elif not hasattr(call, "arguments"):
                text, ok = self.malformed_response, False
            elif (reason := self.refusal(call.name, call.arguments)) is not None:
                text, ok = self.error_prefix + reason, False
            else:
                text, ok = self._run(call)
                if len(text) > self.max_result_chars:
                    text, ok = (f"{self.error_prefix}the result of {call.name} has {len(text)} characters, more "
                                f"than the limit of {self.max_result_chars}"), False
            self.errors += not ok
            out.append(text)
        return out

    def _run(self, call):
        """``run_call`` of one admitted call, held to its contract: ``(str, ok)``, no exception."""
        where = f"{type(self).__name__}.run_call({call.name!r})"
        try:
            result = self.run_call(call.name, call.arguments)
        except (Exception, SystemExit) as exc:  # its own bug (or a CLI's sys.exit): answer failures as (text, False)
            raise ToolEnvError(f"{where} raised {type(exc).__name__}: {excerpt_of(exc)} (an environment answers a "
                               "call it cannot run with (error text, False))") from exc
        # a flag must be a bool (or 0 / 1): bool("False") or bool("error") would count a failed call as a success
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
                and isinstance(result[1], (bool, numpy.bool_, int, numpy.integer)) and result[1] in (0, 1)):
            raise ToolEnvError(f"{where} returned {str(result)[:100]!r}: expected (response text, ran without error: "
                               "True or False)")
        return result[0], bool(result[1])

    def next_user_turn(self):
        """The next user message once the assistant ends a turn (multi-turn environments); None ends the episode."""
        return None

    def close(self):
        """Release what the episode holds (a worker process in ``BFCLEnv``); the rollout calls it after the reward."""
