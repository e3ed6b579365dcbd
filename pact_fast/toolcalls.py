"""Parse tool calls out of model text, in the format a chat template renders them. Never ``eval``.

- ``compact``: ``<tool_call> name ( key = value , ... ) </tool_call>`` (the built-in template);
- ``hermes``: ``<tool_call> {"name": ..., "arguments": {...}} </tool_call>`` (Qwen, Hermes templates).

A malformed call is returned as a ``ToolCallError`` item, which the rollout turns into an error
observation for the model; parsing never raises on model text.
"""
import json
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_COMPACT = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolCallError:
    text: str
    reason: str


def _value(text):
    compact = re.sub(r"\s+", "", text)
    if re.fullmatch(r"-?\d+", compact):
        return int(compact)
    return " ".join(text.split())


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
            args[key] = _value(value)
    return ToolCall(name, args)


def parse_hermes(body):
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return ToolCallError(body, "tool call is not valid JSON")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCallError(body, "tool call needs a string 'name'")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCallError(body, "arguments are not valid JSON")
    if not isinstance(args, dict):
        return ToolCallError(body, "arguments must be an object")
    return ToolCall(obj["name"], args)


PARSERS = {"compact": parse_compact, "hermes": parse_hermes}


def parse_tool_calls(text, fmt="compact"):
    """All tool calls in ``text``: a list of ``ToolCall`` or ``ToolCallError``. An unclosed
    ``<tool_call>`` is an error item too."""
    if fmt not in PARSERS:
        raise ValueError(f"parse_tool_calls: unknown format {fmt!r}; choose one of {sorted(PARSERS)}")
    calls = [PARSERS[fmt](m.group(1)) for m in _BLOCK.finditer(text)]
    if text.count("<tool_call>") > len(calls):
        calls.append(ToolCallError(text[text.rfind("<tool_call>"):], "unclosed <tool_call>"))
    return calls
