"""Parse tool calls out of model text, in the format a chat template renders them. Never ``eval``.

- ``compact``: ``<tool_call> name ( key = value , ... ) </tool_call>`` (the built-in template);
- ``hermes``: ``<tool_call> {"name": ..., "arguments": {...}} </tool_call>`` (Qwen, Hermes templates;
  ``"parameters"`` in place of ``"arguments"``, as Llama 3.1 writes them, is read too).

Only the text after the turn's reasoning (past its last ``</think>`` outside a call) is searched: a call the
model only thinks about is not made.

A malformed call is returned as a ``ToolCallError`` item, which the rollout turns into an error
observation for the model; parsing never raises on model text. A name or argument given twice is one (the
parser does not guess which the model meant). Model text is untrusted, so a call longer than ``MAX_CALL_CHARS``
(a rollout's: ``rollout.max_call_chars``) or with arguments nested deeper than ``MAX_ARGUMENT_DEPTH`` is an error
item before any parser sees it (deep JSON would otherwise raise ``RecursionError``), and error items keep only a
short excerpt of the text.
"""
import json
import re
from dataclasses import dataclass

MAX_CALL_CHARS = 10_000  # characters of one call's text (name and arguments)
MAX_ARGUMENT_DEPTH = 32  # nesting of lists and objects in a call's arguments
EXCERPT_CHARS = 80  # characters of an offending text quoted in an error message

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TAGS = re.compile(f"{re.escape(OPEN)}|{re.escape(CLOSE)}|</think>")
_COMPACT = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


def excerpt(text, limit=EXCERPT_CHARS):
    """``repr`` of at most ``limit`` characters of ``text``, with the total length when it is cut."""
    text = str(text)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolCallError:
    text: str  # an excerpt of the offending call text
    reason: str

    def __post_init__(self):
        if len(self.text) > EXCERPT_CHARS:
            self.text = self.text[:EXCERPT_CHARS] + "..."


def nesting_depth(value, limit=MAX_ARGUMENT_DEPTH):
    """Depth of nested lists, tuples and dicts in ``value`` (a scalar is 0), counted without recursion;
    stops counting once it passes ``limit``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, depth + 1)
            if deepest > limit:
                return deepest
            stack.extend((x, depth + 1) for x in item)
    return deepest


def _value(text):
    """A compact argument's text -> int or str. Digits split by whitespace are one number (the built-in tokenizer
    decodes ``12`` as ``1 2``, ``-5`` as ``- 5``); an int only in its canonical form (``007`` and ``-0`` stay the
    strings ``"007"`` and ``"-0"``, as an id or code would be written). Any other value is its text less the
    spaces around it, inner whitespace kept (a newline in a value is the model's)."""
    digits = re.sub(r"\s+", "", text)
    if re.fullmatch(r"-?\d+", digits):
        if re.fullmatch(r"-?[1-9]\d*|0", digits):
            return int(digits)  # ValueError past Python's 4300-digit limit; parse_compact reports it
        return digits
    return text.strip()


def parse_compact(body):
    m = _COMPACT.match(body)
    if not m:
        return ToolCallError(body, "expected name ( key = value , ... )")
    name, inner = m.group(1), m.group(2).strip()
    args = {}
    if inner:
        for part in inner.split(","):
            if "=" not in part:
                return ToolCallError(body, "an argument is not key = value")
            key, value = part.split("=", 1)
            key = key.strip()
            if not re.fullmatch(r"[A-Za-z_]\w*", key):
                return ToolCallError(body, "bad argument name")
            if key in args:  # which value the model meant is not for the parser to guess
                return ToolCallError(body, f"argument {key} is given twice")
            try:
                args[key] = _value(value)
            except ValueError:  # an integer past Python's int-string conversion limit
                return ToolCallError(body, f"argument {key} is an integer with too many digits")
    return ToolCall(name, args)


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs):
    """A JSON object's pairs -> dict, refusing a key given twice (``json.loads`` keeps the last one silently, so
    ``{"name": "lookup", "name": "add"}`` ran ``add``)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _RepeatedKey(f"ambiguous: the key {excerpt(key, 40)} appears twice")
        obj[key] = value
    return obj


def _loads(text, what):
    """``(value, None)`` for JSON ``text``, or ``(None, why not)``, said of ``what`` ("tool call is", ...)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys), None
    except RecursionError:
        return None, f"{what} nested too deeply"
    except _RepeatedKey as exc:
        return None, f"{what} {exc}"
    except ValueError:  # JSONDecodeError, NaN/Infinity, integers past Python's conversion limit
        return None, f"{what} not valid JSON"


def parse_hermes(body):
    obj, reason = _loads(body, "tool call is")
    if reason:
        return ToolCallError(body, reason)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCallError(body, "tool call needs a string 'name'")
    if "arguments" in obj and "parameters" in obj:
        return ToolCallError(body, "tool call has both 'arguments' and 'parameters'")
    args = obj.get("arguments", obj.get("parameters", {}))  # "parameters": Llama 3.1's name for them
    if isinstance(args, str):
        args, reason = _loads(args, "arguments are")
        if reason:
            return ToolCallError(body, reason)
    if not isinstance(args, dict):
        return ToolCallError(body, "arguments must be an object")
    return ToolCall(obj["name"], args)


PARSERS = {"compact": parse_compact, "hermes": parse_hermes}


def parse_one(body, fmt="compact", max_chars=MAX_CALL_CHARS):
    """One call's text (between the tags) -> ``ToolCall`` or ``ToolCallError``, size (``max_chars``: a rollout's
    ``rollout.max_call_chars``) and depth capped."""
    if len(body) > max_chars:
        return ToolCallError(body, f"tool call has {len(body)} characters, more than the limit of {max_chars}")
    call = PARSERS[fmt](body)
    if isinstance(call, ToolCall) and nesting_depth(call.arguments) > MAX_ARGUMENT_DEPTH:
        return ToolCallError(body, f"arguments are nested deeper than {MAX_ARGUMENT_DEPTH} levels")
    return call


def _reasoning_end(text):
    """Where the reasoning of ``text`` ends: past its last ``</think>`` that lies in no call (between a
    ``<tool_call>`` and the ``</tool_call>`` that closes it: text a call writes or sends), or 0. A call opened in
    the reasoning and closed there, or never closed, holds no ``</think>``; one pass over the tags."""
    end, inside, in_call = 0, 0, False  # inside: the last </think> since the open call's <tool_call>
    for tag in _TAGS.finditer(text):
        if tag.group() == OPEN:
            in_call = True
        elif tag.group() == CLOSE:
            in_call, inside = False, 0  # the call closed: its </think> was text of its arguments
        elif in_call:
            inside = tag.end()
        else:
            end = tag.end()
    return max(end, inside)


def parse_tool_calls(text, fmt="compact", max_chars=MAX_CALL_CHARS):
    """All tool calls in ``text`` after its reasoning (``_reasoning_end``: a call the model only thinks about is not
    made): a list of ``ToolCall`` or ``ToolCallError``, one per ``<tool_call>`` block, read left to right in one
    pass (a degenerate turn of many unclosed tags costs linear time). An unclosed ``<tool_call>`` is an error item
    too, and so is a call's text longer than ``max_chars`` (``parse_one``)."""
    if fmt not in PARSERS:
        raise ValueError(f"parse_tool_calls: unknown format {fmt!r}; choose one of {sorted(PARSERS)}")
    calls, i = [], _reasoning_end(text)
    while (start := text.find(OPEN, i)) >= 0:
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            calls.append(ToolCallError(text[start:], "unclosed <tool_call>"))
            break
        calls.append(parse_one(text[start + len(OPEN):end], fmt, max_chars))
        i = end + len(CLOSE)
    return calls
