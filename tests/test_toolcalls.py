"""Tool-call parsing and tool execution against hostile model output: every case returns promptly with a
short error observation, never an exception out of the parser or the environment."""
import json
import time

import pytest

from pact_fast.data import parse_example
from pact_fast.envs import make_task
from pact_fast.envs.multihop import MultiHopEnv
from pact_fast.toolcalls import (MAX_ARGUMENT_DEPTH, MAX_CALL_CHARS, ToolCall, ToolCallError, nesting_depth,
                                 parse_tool_calls)


def _block(body):
    return f"<tool_call>{body}</tool_call>"


HOSTILE = {
    "compact-unary-minus": ("compact", "add ( a = " + "-" * 100_000 + "1 , b = 2 )", "characters, more than the limit"),
    "compact-attribute-chain": ("compact", "a" + ".b" * 100_000 + " ( )", "characters, more than the limit"),
    "compact-nesting": ("compact", "f ( x = " + "(" * 10_000 + ")" * 10_000 + " )", "characters, more than the limit"),
    "compact-5000-digits": ("compact", "add ( a = " + "7" * 5_000 + " , b = 1 )", "too many digits"),
    "hermes-nested-arrays": ("hermes", '{"name": "f", "arguments": {"x": ' + "[" * 4_000 + "]" * 4_000 + "}}",
                             "nested too deeply"),
    "hermes-nested-under-recursion-limit": ("hermes", '{"name": "f", "arguments": {"x": ' + "[" * 100 + "]" * 100
                                            + "}}", f"nested deeper than {MAX_ARGUMENT_DEPTH}"),
    "hermes-nested-string-arguments": ("hermes", json.dumps({"name": "f", "arguments": "[" * 4_000 + "]" * 4_000}),
                                       "nested too deeply"),
    "hermes-5000-digits": ("hermes", '{"name": "add", "arguments": {"a": ' + "7" * 5_000 + ', "b": 1}}',
                           "not valid JSON"),
    "hermes-nan": ("hermes", '{"name": "add", "arguments": {"a": NaN, "b": 1}}', "not valid JSON"),
    "hermes-repeated-name": ("hermes", '{"name": "lookup", "name": "add", "arguments": {"a": 1, "b": 2}}',
                             "tool call is ambiguous: the key 'name' appears twice"),
    "hermes-repeated-argument": ("hermes", '{"name": "add", "arguments": "{\\"a\\": 1, \\"a\\": 9, \\"b\\": 2}"}',
                                 "arguments are ambiguous: the key 'a' appears twice"),
    "compact-repeated-argument": ("compact", "add ( a = 1 , a = 9 , b = 2 )", "argument a is given twice"),
    "hermes-huge": ("hermes", json.dumps({"name": "f", "arguments": {"x": "y" * 20_000}}),
                    "characters, more than the limit"),
}


@pytest.mark.parametrize("fmt,body,reason", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_calls_are_short_error_items(fmt, body, reason):
    start = time.perf_counter()
    calls = parse_tool_calls("<think> x </think> " + _block(body), fmt)
    assert time.perf_counter() - start < 5.0
    assert len(calls) == 1 and isinstance(calls[0], ToolCallError), calls
    assert reason in calls[0].reason
    assert len(calls[0].text) < 100 and len(calls[0].reason) < 200, "errors quote only an excerpt"
    env = MultiHopEnv(parse_example(make_task(0, hops=1)))
    assert env.step(calls) == ["error : bad tool call"] and env.errors == 1


def test_a_call_whose_arguments_read_think_end_is_made_and_a_call_in_the_reasoning_is_not():
    """Parsing began past the last "</think>" anywhere: a call writing "</think>" (a file's text, a message) was cut
    in two, and the turn, without a call, was taken as the final answer."""
    call = _block(json.dumps({"name": "echo", "arguments": {"content": "done </think>"}}))
    assert parse_tool_calls("<think> i write it </think> " + call, "hermes") == [
        ToolCall("echo", {"content": "done </think>"})]
    assert parse_tool_calls("<think> maybe " + call + " no </think> 42", "hermes") == []
    assert parse_tool_calls(call, "hermes") == [ToolCall("echo", {"content": "done </think>"})]
    # a stray </tool_call> in the answer made the last </think> look like a call's text: the drafted call ran
    draft = _block(json.dumps({"name": "delete_all", "arguments": {}}))
    assert parse_tool_calls("<think> maybe " + draft + " no. </think> Done (a stray </tool_call>)", "hermes") == []
    # a <tool_call> the reasoning only mentions holds no </think>: the answer after it is the turn's
    assert parse_tool_calls("<think> I could write <tool_call> here </think> 42", "hermes") == []


def test_calls_at_the_size_limit_still_parse():
    value = "w" * (MAX_CALL_CHARS - 40)
    (call,) = parse_tool_calls(_block(f"initial ( word = {value} )"))
    assert call == ToolCall("initial", {"word": value})
    (call,) = parse_tool_calls(_block(json.dumps({"name": "f", "arguments": {"x": [[[1]]]}})), "hermes")
    assert call == ToolCall("f", {"x": [[[1]]]})


def test_nesting_depth_counts_without_recursion():
    value = 1
    for _ in range(50_000):
        value = [value]
    assert nesting_depth(value, limit=10**9) == 50_000
    assert nesting_depth({"a": [1, {"b": [2]}]}) == 4
    assert nesting_depth(7) == 0


def test_environment_refuses_oversized_or_deep_arguments_and_huge_results():
    ex = parse_example(make_task(0, hops=1))
    env = MultiHopEnv(ex, max_result_chars=5)
    deep = 1
    for _ in range(MAX_ARGUMENT_DEPTH + 1):
        deep = [deep]
    out = env.step([ToolCall("initial", {"word": "x" * (MAX_CALL_CHARS + 1)}), ToolCall("initial", {"word": deep}),
                    ToolCall("add", {"a": 10 ** 4000, "b": 10 ** 4000}), ToolCall("add", {"a": 1, "b": 2}),
                    ToolCall("x" * 1_000, {}), ToolCall("add", ["a", "b"])])
    assert out[0] == f"error : arguments of initial are longer than the limit of {MAX_CALL_CHARS} characters"
    assert out[1] == f"error : arguments of initial are nested deeper than {MAX_ARGUMENT_DEPTH} levels"
    assert out[2] == "error : the result of add has 4001 characters, more than the limit of 5"
    assert out[3] == "3"
    assert out[4] == "error : bad tool name" and out[5] == "error : arguments of add must be an object"
    assert env.errors == 5


def test_non_finite_numbers_are_tool_errors_not_crashes():
    env = MultiHopEnv(parse_example(make_task(0, hops=1)))
    (call,) = parse_tool_calls(_block('{"name": "add", "arguments": {"a": 1e999, "b": 1}}'), "hermes")
    assert call.arguments["a"] == float("inf")
    assert env.step([call]) == ["error : a must be a whole number"]


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("1 2", 12), ("- 5", -5), ("0", 0),  # the built-in tokenizer decodes 12 as "1 2", -5 as "- 5"
    ("007", "007"), ("0 0 7", "007"), ("-0", "-0"),  # not an int's canonical form: an id or a code, kept as text
    ("New  York", "New  York"), ("line one\nline two", "line one\nline two"),  # inner whitespace is the model's
])
def test_compact_values_keep_what_the_model_wrote(text, value):
    calls = parse_tool_calls(_block(f" lookup ( key = {text} ) "), "compact")
    assert calls == [ToolCall("lookup", {"key": value})]
    assert type(calls[0].arguments["key"]) is type(value)
