import bz2
import copy
import json
import lzma
import os
import re

import pytest

from pact_fast.data import DataFormatError, check_trainable, load_data, load_examples, parse_example, write_examples
from pact_fast.envs import make_task


def _good():
    return make_task(0, hops=2)


BAD_ROWS = [
    ("not json", "invalid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
    (json.dumps({**_good(), "id": None}), "id"),
    (json.dumps({**_good(), "messages": []}), "messages"),
    (json.dumps({**_good(), "messages": [{"role": "system", "content": "x"}]}), "no user message"),
    (json.dumps({**_good(), "messages": [{"role": "robot", "content": "x"}]}), "messages\\[0\\].role"),
    (json.dumps({**_good(), "tools": [{"type": "function"}]}), "tools\\[0\\]"),
    (json.dumps({**_good(), "trace": [{"role": "tool", "tool_call_id": "zz", "content": "x"}]}), "answers no earlier"),
    (json.dumps({**_good(), "trace": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "lookup", "arguments": "{bad json"}}]}]}), "not valid JSON"),
    (json.dumps({**_good(), "trace": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "fly", "arguments": {}}}]}]}), "does not list"),
    (json.dumps({**_good(), "env": []}), "'env'"),
]


def test_loader_reports_file_line_and_reason(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(_good())] + [row for row, _ in BAD_ROWS] + [json.dumps(make_task(1, hops=1))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}:2: invalid JSON"):
        load_examples(path)
    examples, report = load_examples(path, on_error="skip")
    assert [e.id for e in examples] == [_good()["id"], make_task(1, hops=1)["id"]]
    assert [line for line, _ in report.skipped] == list(range(2, 2 + len(BAD_ROWS)))
    for (line, reason), (_, expected) in zip(report.skipped, BAD_ROWS):
        assert re.search(expected, reason), (line, reason)
    assert report.loaded == 2 and "2 rows loaded, 11 skipped" in report.summary()


def test_each_bad_row_fails_with_its_own_reason(tmp_path):
    for k, (row, expected) in enumerate(BAD_ROWS):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(json.dumps(_good()) + "\n" + row + "\n")
        with pytest.raises(DataFormatError, match=rf":2: .*{expected}"):
            load_examples(path)


def test_arguments_as_json_strings_are_normalised_and_round_trip(tmp_path):
    row = _good()
    call = row["trace"][0]["tool_calls"][0]
    call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    ex = parse_example(row)
    assert isinstance(ex.trace[0]["tool_calls"][0]["function"]["arguments"], dict)
    path = tmp_path / "out.jsonl"
    write_examples(path, [ex])
    again, _ = load_examples(path)
    assert again[0].to_json() == ex.to_json()


def test_tools_and_parameters_as_json_text_are_decoded_and_checked_as_objects():
    """``datasets`` stores a column of mixed shapes as JSON text (xLAM's ``tools``, a spec's ``parameters``): read
    as the objects they spell, schema checks included, where ``parameters`` as text was refused."""
    row = _good()
    as_text = copy.deepcopy(row)
    for t in as_text["tools"]:
        t["function"]["parameters"] = json.dumps(t["function"]["parameters"])
    assert parse_example(as_text).to_json() == parse_example(row).to_json()
    as_text["tools"] = json.dumps(as_text["tools"])
    assert parse_example(as_text).to_json() == parse_example(row).to_json()
    narrow = copy.deepcopy(row)  # the trace calls lookup with entity and relation: a schema listing one refuses it
    params = narrow["tools"][0]["function"]["parameters"]
    params["properties"].pop("relation")
    params["required"] = [r for r in params.get("required", []) if r != "relation"]
    narrow["tools"][0]["function"]["parameters"] = json.dumps(params)
    with pytest.raises(DataFormatError, match=r"argument\(s\) \['relation'\] that its parameters do not list"):
        parse_example(narrow)
    assert parse_example({**row, "tools": " "}).tools == []  # empty text: none, as a call's arguments ""
    with pytest.raises(DataFormatError, match=r"^trace\[0\]\.tool_calls\[0\]\.function\.arguments: 1e400 is past a "
                                              r"float's range"):
        call = {**row["trace"][0]["tool_calls"][0], "function": {
            "name": "lookup", "arguments": '{"entity": 1e400, "relation": "age"}'}}
        parse_example({**row, "trace": [{**row["trace"][0], "tool_calls": [call]}] + row["trace"][1:]})
    # null: a spec without parameters in a column of specs with them (datasets' JSONL), as if left out; was refused
    for no_params in ({"name": "ping"}, {"name": "ping", "parameters": None}):
        spec = parse_example({**row, "tools": row["tools"] + [{"type": "function", "function": no_params}]}).tools[-1]
        assert spec["function"]["parameters"] == {"type": "object", "properties": {}}
    for bad, match in (("[{", r"^tools is not valid JSON"), ('{"a": 1}', r"^tools must be a list"),
                       ('[{"type": "function", "function": {"name": "f", "parameters": "[1"}}]',
                        r"tools\[0\].function.parameters is not valid JSON"),
                       ('[{"type": "function", "function": {"name": "f", "parameters": "[1]"}}]',
                        r"tools\[0\].function.parameters must be a JSON schema object")):
        with pytest.raises(DataFormatError, match=match):
            parse_example({**row, "tools": bad})


def test_a_file_of_only_bad_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{}\n")
    with pytest.raises(DataFormatError, match="no valid rows"):
        load_examples(path, on_error="skip")


def _with_trace(trace):
    return json.dumps({**_good(), "id": "t", "trace": trace})


_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"entity": "maya",
                                                                                "relation": "age"}}}]}
_ANSWER = {"role": "tool", "tool_call_id": "c1", "content": "33"}
_FINAL = {"role": "assistant", "content": "33"}
_BAD_TOOLS = [{**_good()["tools"][0], "function": {**_good()["tools"][0]["function"], "parameters": {
    "type": "object", "properties": ["entity", "relation"]}}}]

# (raw line bytes, reason the loader must give)
HOSTILE_ROWS = [
    (json.dumps({**_good(), "id": "u"}).replace('"u"', '"u\\u00e9"').encode().replace(b"\\u00e9", b"\xff"),
     r"not UTF-8 \(byte 0xff at column \d+\)"),
    (json.dumps({**_good(), "id": "big", "answer": 1}).replace('"answer": 1', '"answer": ' + "7" * 5000).encode(),
     "a number has more digits than Python.s int conversion limit"),
    (("[" * 100_000 + "]" * 100_000).encode(), "JSON nested too deeply"),
    (json.dumps(_good()).encode(), r"duplicate id 'multihop-0-0' \(first on line 1\)"),
    (_with_trace([_CALL, _ANSWER, _FINAL, {"role": "assistant", "content": "again"}]).encode(),
     r"trace\[3\] is an assistant turn after the final answer trace\[2\]"),
    (_with_trace([_CALL, _FINAL]).encode(), r"trace\[0\].tool_calls\[0\] \(id 'c1'\) is never answered"),
    (_with_trace([_CALL]).encode(), r"trace\[0\].tool_calls\[0\] \(id 'c1'\) is never answered"),
    (_with_trace([_CALL, _ANSWER, _ANSWER, _FINAL]).encode(), r"trace\[2\].tool_call_id 'c1' answers a tool call a "
                                                              r"second time"),
    (_with_trace([_CALL, _ANSWER, _CALL, _ANSWER, _FINAL]).encode(), r"trace\[2\].tool_calls\[0\].id 'c1' is used"),
    (json.dumps({**_good(), "id": "p", "tools": _BAD_TOOLS}).encode(),
     r"tools\[0\].function.parameters.properties must be an object"),
    (json.dumps({**_good(), "id": "nan", "answer": 1.5}).replace("1.5", "NaN").encode(), "NaN is not a JSON number"),
    (json.dumps({**_good(), "id": "inf", "answer": 1.5}).replace("1.5", "-Infinity").encode(),
     "-Infinity is not a JSON number"),
    # a number literal past a double's range: Python's json reads it as inf, which "numbers must be finite" refuses
    (json.dumps({**_good(), "id": "overflow", "env": {"name": "m:X", "t": 1.5}}).replace("1.5", "-1e999").encode(),
     r"-1e999 is past a float's range \(numbers must be finite\)"),
    (json.dumps({**_good(), "id": "surrogate", "answer": "x"}).replace('"x"', '"a\\ud800b"').encode(),
     "a string holds a lone surrogate escape"),
    # OpenAI's fine-tuning layout, the whole conversation in 'messages'
    (json.dumps({**_good(), "id": "ft", "messages": _good()["messages"] + _good()["trace"], "trace": []}).encode(),
     r"messages\[\d\]\.role is 'assistant'; expected one of \['system', 'user'\]: 'messages' is the prompt, the "
     "expert's turns go in 'trace'"),
    # read as a function of no arguments, Anthropic's schema rendered beside it (silently where no trace calls it)
    (json.dumps({**_good(), "id": "anthropic", "trace": [], "tools": [{"type": "function", "function": {
        "name": "lookup", "input_schema": {"type": "object", "properties": {"entity": {}}}}}]}).encode(),
     r"tools\[0\]\.function has 'input_schema' \(Anthropic's name for its arguments' schema\): name it 'parameters'"),
    # rows split by a bare \r: it said "Extra data at column 1003" alone
    (b"\r".join([json.dumps({**_good(), "id": "cr"}).encode()] * 2),
     r"invalid JSON \(Extra data at column \d+\): rows separated by a bare carriage return"),
    # json keeps the last of a key given twice: this row trained toward "paris", another reader's toward "rome"
    (json.dumps({**_good(), "id": "twice", "answer": "rome"}).replace('"answer": "rome"',
                                                                      '"answer": "rome", "answer": "paris"').encode(),
     "an object gives the key 'answer' twice"),
    (json.dumps({**_good(), "id": "twice-in-arguments", "trace": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "lookup", "arguments": '{"entity": "maya", "entity": "ivan"}'}}]}]}).encode(),
     r"trace\[0\]\.tool_calls\[0\]\.function\.arguments: an object gives the key 'entity' twice"),
    # every episode's call of it was refused as "bad tool name", while the trace taught calling it
    (json.dumps({**_good(), "id": "long-name", "tools": [{"type": "function", "function": {"name": "f" * 101}}],
                 "trace": []}).encode(),
     r"tools\[0\]\.function\.name has 101 characters: a rollout runs no call of a name longer than 100"),
    # a role that is a list or an object stopped the load with "TypeError: unhashable type"
    (json.dumps({**_good(), "id": "role-list", "messages": [{"role": ["user"], "content": "q"}]}).encode(),
     r"messages\[0\]\.role is \['user'\]; expected one of \['system', 'user'\]"),
    (_with_trace([{**_FINAL, "role": {"name": "assistant"}}]).encode(),
     r"trace\[0\]\.role is \{'name': 'assistant'\}; expected one of \['assistant', 'tool', 'user'\]"),
]


def test_hostile_rows_are_reported_with_file_line_and_reason(tmp_path):
    path = tmp_path / "hostile.jsonl"
    good_last = json.dumps(make_task(1, hops=1)).encode()
    path.write_bytes(b"\n".join([json.dumps(_good()).encode()] + [row for row, _ in HOSTILE_ROWS] + [good_last]))
    examples, report = load_examples(path, on_error="skip")
    assert [e.id for e in examples] == [_good()["id"], make_task(1, hops=1)["id"]]
    assert [line for line, _ in report.skipped] == list(range(2, 2 + len(HOSTILE_ROWS)))
    for (line, reason), (_, expected) in zip(report.skipped, HOSTILE_ROWS):
        assert re.search(expected, reason), (line, reason)
        assert len(reason) < 300, "the reason does not echo the row"
    for k, (row, expected) in enumerate(HOSTILE_ROWS):
        one = tmp_path / f"hostile{k}.jsonl"
        one.write_bytes(json.dumps(_good()).encode() + b"\n" + row + b"\n")
        with pytest.raises(DataFormatError, match=rf"^{re.escape(str(one))}:2: {expected}"):
            load_examples(one)


def test_a_later_user_turn_can_make_tools_available():
    row = _good()
    extra = {"type": "function", "function": {"name": "shout", "description": "upper-case a word",
                                              "parameters": {"type": "object", "properties": {"w": {"type": "string"}},
                                                             "required": ["w"]}}}
    shout = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "s1", "type": "function", "function": {"name": "shout", "arguments": {"w": "x"}}}]}
    later = row["trace"] + [{"role": "user", "content": "now shout", "tools": [extra]}, shout,
                            {"role": "tool", "tool_call_id": "s1", "content": "X"},
                            {"role": "assistant", "content": "X"}]
    ex = parse_example({**row, "trace": later})
    assert ex.trace[len(row["trace"])]["tools"] == [extra]
    hidden = [*row["trace"], {"role": "user", "content": "now the other one", "tools": [extra]}, *later[-3:]]
    with pytest.raises(DataFormatError, match=r"trace\[\d+\]\.tools specifies 'shout', which the turn's text does "
                                              "not show: a user turn is rendered .* as its text alone"):
        parse_example({**row, "trace": hidden})  # it trained calls of a function the model was never shown
    early = [{"role": "user", "content": "shout first"}, shout] + later
    with pytest.raises(DataFormatError, match="'shout', which 'tools' does not list"):
        parse_example({**row, "trace": row["trace"] + early[:2]})


def test_written_rows_never_contain_nan(tmp_path):
    with pytest.raises(ValueError):
        write_examples(tmp_path / "x.jsonl", [{**_good(), "answer": float("nan")}])


def test_a_truncated_row_is_reported_where_the_line_ends(tmp_path):
    from pact_fast.data import DataFormatError, load_examples

    path = tmp_path / "cut.jsonl"
    path.write_text('{"id": "a", "messages": [\n')
    with pytest.raises(DataFormatError, match=r"cut.jsonl:1: invalid JSON: the line ends after column 25 .*truncated"):
        load_examples(path)
    path.write_text('{"id": "a", "messages": "ab\tc"}\n')  # json's message ends in "at": it was cut there
    with pytest.raises(DataFormatError, match=r"cut.jsonl:1: invalid JSON \(Invalid control character at column 28\)$"):
        load_examples(path)
    with pytest.raises(FileNotFoundError, match=rf"data.path={tmp_path}: a directory; give a JSONL file"):
        load_data(_split_config(tmp_path))


@pytest.mark.parametrize("drop,message", [
    (("tools",), "missing 'tools'"),
    (("env",), "missing 'env'"),
    (("answer",), "missing 'answer'"),
    (("trace",), "missing 'trace'"),
    (("tools", "trace", "answer", "env"), "missing 'tools'"),
])
def test_a_row_that_cannot_train_names_file_line_and_field(tmp_path, drop, message):
    """A row that parses but would train at zero loss and zero reward is refused with file, line and field."""
    from pact_fast.data import check_trainable

    path = tmp_path / "rows.jsonl"
    row = {k: v for k, v in make_task(1, hops=1).items() if k not in drop}
    path.write_text(json.dumps(_good()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:2: {re.escape(message)}"):
        load_examples(path, check=check_trainable)
    examples, report = load_examples(path, on_error="skip", check=check_trainable)
    assert len(examples) == 1 and report.skipped[0][0] == 2 and message in report.skipped[0][1]


def test_null_columns_are_absent_ones(tmp_path):
    """`datasets` writes every column on every row, null where a row has none (a test split's trace, tools or env):
    a held-out row with "trace": null was refused as "'trace' must be a list", where a row without the key loads."""
    from pact_fast.data import load_data

    rows = [make_task(k, hops=1) for k in range(10)]
    rows[0]["trace"] = None
    rows[1].update(trace=None, metadata=None)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = load_data(_split_config(path))
    assert [(ex.id, ex.trace) for ex in held_out] == [(rows[0]["id"], []), (rows[1]["id"], [])]
    assert parse_example({**_good(), "tools": None, "env": None}) == parse_example({**_good(), "tools": [], "env": {}})


def test_a_call_with_geminis_extra_content_loads():
    """Traces distilled through Gemini's OpenAI-compatible API carry "extra_content" (a thought signature) on every
    tool call: refused as a key this format does not read, though no call runs with it."""
    row = _good()
    plain = parse_example(copy.deepcopy(row))
    for m in row["trace"]:
        for call in m.get("tool_calls") or ():
            call["extra_content"] = {"google": {"thought_signature": "CiQB0e2Kb..."}}
    got = parse_example(row)
    assert [c["function"] for m in got.trace for c in m.get("tool_calls") or ()] == \
        [c["function"] for m in plain.trace for c in m.get("tool_calls") or ()]


def test_null_fields_of_messages_and_calls_are_absent_ones():
    """`datasets` writes a null for every struct field on every message and call that lacks it: a later user turn's
    "tools": null was refused as "must be a list", and a call's "parameters": null beside its "arguments" (another
    row used Llama's name) as "has both 'arguments' and 'parameters'"."""
    row = _good()
    row["trace"] += [{"role": "user", "content": "And once more?"}, {"role": "assistant", "content": row["answer"]}]
    nulled = copy.deepcopy(row)
    for m in nulled["messages"] + nulled["trace"]:
        m.setdefault("tools", None)
        for call in m.get("tool_calls") or ():
            call["function"].setdefault("parameters", None)
    assert any(m.get("tool_calls") for m in nulled["trace"])
    got, want = parse_example(nulled), parse_example(row)

    def calls(ex):
        return [c["function"] for m in ex.trace for c in m.get("tool_calls") or ()]

    assert [c["arguments"] for c in calls(got)] == [c["arguments"] for c in calls(want)]
    assert [(m["role"], m.get("content")) for m in got.messages + got.trace] == \
        [(m["role"], m.get("content")) for m in want.messages + want.trace]


def test_grpo_rows_need_no_trace_but_still_their_reward():
    from functools import partial

    from pact_fast.data import check_trainable

    grpo = partial(check_trainable, needs_trace=False)
    grpo(parse_example({**_good(), "trace": []}))
    with pytest.raises(DataFormatError, match="missing 'trace'"):
        check_trainable(parse_example({**_good(), "trace": []}))
    with pytest.raises(DataFormatError, match="missing 'answer'"):
        grpo(parse_example({**_good(), "answer": None}))
    for empty in ("", "  "):  # MultiHopEnv's reward paid an empty reply 1.0 against an empty answer
        with pytest.raises(DataFormatError, match="'answer' is empty: the multihop reward would pay an empty reply"):
            grpo(parse_example({**_good(), "answer": empty}))
    with pytest.raises(DataFormatError, match="trace\\[0\\] is a user turn that follows no final answer"):
        parse_example({**_good(), "trace": [{"role": "user", "content": "more"}]})  # no assistant turn: no trace


@pytest.mark.parametrize("env,reason", [({"name": "chess"}, "unknown env name 'chess'; known: multihop, bfcl"),
                                        ({"name": "multihop", "world_seed": "zero"},
                                         "env 'world_seed' must be an integer, got 'zero'")])
def test_a_row_no_environment_can_run_is_refused_with_file_and_line(tmp_path, env, reason):
    """Such a row parses, then fails inside the first step's rollouts; the loader refuses it, naming file and line."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(make_task(0, hops=1)) + "\n" + json.dumps({**make_task(1, hops=1), "env": env}) + "\n")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: {re.escape(reason)}"):
        load_examples(path, check=check_trainable)


def test_a_tool_of_no_arguments_may_leave_out_its_parameters():
    """OpenAI function specs make ``parameters`` optional: a tool without it takes no arguments (an empty object
    schema), as the chat templates and the environment then see it."""
    row = _good()
    row["tools"].append({"type": "function", "function": {"name": "now", "description": "the time"}})
    ex = parse_example(row)
    assert ex.tools[-1]["function"]["parameters"] == {"type": "object", "properties": {}}
    row["tools"][0]["function"].pop("parameters")  # lookup, which the trace calls with arguments
    with pytest.raises(DataFormatError, match=r"calls 'lookup' with argument\(s\) \['entity', 'relation'\] that "
                                              r"its parameters do not list \(none;"):
        parse_example(row)


def test_a_flat_argument_map_or_a_second_spec_of_one_name_is_refused():
    """xLAM's flat ``parameters`` ({"city": {"type": "str"}}, no ``properties``) passed as a schema that checks
    nothing, so a misspelt argument trained; a tool named twice showed both specs in the prompt while calls were
    checked against the last one."""
    row = _good()
    fn = row["tools"][0]["function"]
    flat = {**row, "tools": [{"type": "function", "function": {**fn, "parameters": fn["parameters"]["properties"]}}]}
    with pytest.raises(DataFormatError, match=r"tools\[0\].function.parameters must be a JSON schema .* neither "
                                              r"'type' nor 'properties' but \['entity', 'relation'\]"):
        parse_example(flat)
    # with an argument named "type" (xLAM's search tools have one) it read as a schema of no properties: every
    # argument passed, misspelt or not
    flat["tools"] = copy.deepcopy(row["tools"])
    flat["tools"][0]["function"]["parameters"] = {**fn["parameters"]["properties"], "type": {"type": "str"}}
    with pytest.raises(DataFormatError, match=r"tools\[0\].function.parameters.type is dict, not a JSON schema "
                                              r"type \(a string, or a list of them\): a flat map of arguments"):
        parse_example(flat)
    twice = {**row, "tools": row["tools"] + [row["tools"][0]]}
    n = len(row["tools"])
    with pytest.raises(DataFormatError, match=rf"tools\[{n}\] is a second function named {fn['name']!r} \(the "
                                              r"first is tools\[0\]\)"):
        parse_example(twice)


@pytest.mark.parametrize("change,where,key", [
    (lambda r: r.update(answr=r.pop("answer")), "the row", "answr"),  # a typo: the reward lost its answer
    (lambda r: r.update(conversations=[{"from": "human", "value": "hi"}]), "the row", "conversations"),
    (lambda r: r["trace"][-1].update(weight=0), "trace[6]", "weight"),  # axolotl: do not train on this turn
    (lambda r: r["messages"][-1].update(tool_calls=[{"id": "x"}]), "messages[1]", "tool_calls"),
    (lambda r: r["trace"][0].update(tools=[{"type": "function"}]), "trace[0]", "tools"),
    (lambda r: r["messages"][-1].update(reasoning_content="think"), "messages[1]", "reasoning_content"),
    (lambda r: r["trace"][-1].update(refusal="I can't help"), "trace[6]", "refusal"),  # the text was dropped
])
def test_a_key_the_format_does_not_read_is_refused_not_dropped(change, where, key):
    """Each of these loaded and trained with the key dropped without a word."""
    row = _good()
    change(row)
    with pytest.raises(DataFormatError, match=rf"^{re.escape(where)} has '{key}', a key this format does not read"):
        parse_example(row)


def test_empty_values_of_other_keys_and_metadata_of_your_own_load():
    """The OpenAI SDK writes "refusal": null and "annotations": [] on messages; fields of the user's own go under
    "metadata", which is never read."""
    row = _good()
    row["metadata"] = {"source": "xlam", "difficulty": 3}
    row["messages"][-1]["annotations"] = []
    row["trace"][0]["refusal"] = None
    row["trace"][0]["weight"] = 1  # OpenAI's fine-tuning format: the turn trains
    assert parse_example(row).id == row["id"]
    row["trace"].append({"role": "user", "content": "and again?", "tools": [row["tools"][0]]})
    row["trace"].append({"role": "assistant", "content": "the same"})
    with pytest.raises(DataFormatError, match=r"trace\[7\].tools specifies 'lookup' again; a tool is specified once"):
        parse_example(row)


def _split_config(path, **kw):
    from pact_fast.config import DataConfig

    return DataConfig(**{"path": str(path), "eval_tasks": 2, **kw})


def test_a_run_and_its_evaluation_split_a_file_alike(tmp_path, capsys):
    """The held-out split is made before the trace check: a run (needs_trace) and `pact-fast eval` of it (no
    trace needed) hold out the same rows; before, rows without a trace shifted the eval's split onto a row the
    run trained on. A training row without a trace is still refused (file:line) or, with skip, counted."""
    from pact_fast.data import load_data

    rows = [make_task(k, hops=1) for k in range(12)]
    rows[0]["trace"] = []  # a held-out row needs no trace
    rows[7]["trace"] = []
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match="^" + re.escape(f"{path}:8 (id 'multihop-0-7'): missing 'trace'")):
        load_data(_split_config(path))
    train, held_out = load_data(_split_config(path, on_error="skip"))
    said = capsys.readouterr()  # on stderr: stdout is the command's JSON (`pact-fast train > summary.json`)
    assert f"{path}: 11 rows loaded, 1 skipped (first: line 8: missing 'trace'" in said.err and not said.out
    _, eval_held_out = load_data(_split_config(path, on_error="skip"), needs_trace=False)
    assert [ex.id for ex in held_out] == [ex.id for ex in eval_held_out] == [rows[0]["id"], rows[1]["id"]]
    assert [ex.id for ex in train] == [r["id"] for k, r in enumerate(rows) if k >= 2 and k != 7]


def test_a_split_smaller_than_data_eval_tasks_is_said(tmp_path):
    """data.eval_tasks=16 (a pretrained model's default) on a file of 40 rows held out 8, a fifth, without a word."""
    from pact_fast.data import load_data

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(make_task(k, hops=1)) + "\n" for k in range(40)))
    said = []
    _, held_out = load_data(_split_config(path, eval_tasks=16), log=said.append)
    assert len(held_out) == 8 and said == [f"[pact_fast] data.eval_tasks=16: 8 rows of {path} held out, at most a "
                                           "fifth of its 40 (data.eval_path gives a held-out file of its own)"]
    said.clear()
    load_data(_split_config(path, eval_tasks=8), log=said.append)
    assert not said


def test_skipped_held_out_rows_and_ids_shared_with_training_are_reported(tmp_path, capsys):
    from pact_fast.data import load_data

    rows = [make_task(k, hops=1) for k in range(6)]
    path, eval_path = tmp_path / "rows.jsonl", tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [make_task(k, hops=1) for k in (5, 6, 7)]
    held[1].pop("answer")
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    _, held_out = load_data(_split_config(path, eval_path=str(eval_path), on_error="skip"))
    said = capsys.readouterr()  # on stderr: on stdout they were read as part of `pact-fast train > summary.json`
    out = said.err
    assert not said.out
    assert [ex.id for ex in held_out] == [held[0]["id"], held[2]["id"]]
    assert f"{eval_path}: 2 rows loaded, 1 skipped (first: line 2: missing 'answer'" in out
    assert f"1 held-out ids are also training rows (first: {held[0]['id']!r})" in out


def _call_turn(i=0):
    """Index of the first trace turn of ``_good()`` that calls a tool, and the row."""
    row = _good()
    return row, next(k for k, m in enumerate(row["trace"]) if m.get("tool_calls"))


def _edit(change):
    row, k = _call_turn()
    change(row, k)
    return row


# (change to a good row, words of the refusal): what other conventions and a hurried conversion produce, each
# refused naming the field, where before it loaded and trained something else
CONVERSIONS = {
    "legacy-function-call": (lambda r, k: r["trace"][k].update(
        function_call={"name": "lookup", "arguments": "{}"}), r"trace\[\d+\] has OpenAI's legacy 'function_call'"),
    "reasoning-key": (lambda r, k: r["trace"][k].update(reasoning="i look it up"), "name it 'reasoning_content'"),
    "thinking-key": (lambda r, k: r["trace"][k].update(thinking="i look it up"), "name it 'reasoning_content'"),
    "content-parts": (lambda r, k: r["messages"][-1].update(content=[{"type": "text", "text": "hi"}]),
                      r"messages\[\d\]\.content is a list of content parts; give it as one string"),
    "null-user": (lambda r, k: r["messages"][-1].update(content=None), r"content is null: a user message needs"),
    "null-system": (lambda r, k: r["messages"][0].update(content=None), r"content is null: a system message needs"),
    "empty-user": (lambda r, k: r["messages"][-1].update(content=" "), r"content is empty: a user message needs"),
    "missing-required-argument": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"]["arguments"].pop("entity"),
                                  r"calls 'lookup' without its required argument\(s\) \['entity'\]"),
    "unknown-argument": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"]["arguments"].update(city="x"),
                         r"with argument\(s\) \['city'\] that its parameters do not list"),
    "both-arguments-and-parameters": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"].update(parameters={}),
                                      "has both 'arguments' and 'parameters'"),
    "call-without-id": (lambda r, k: r["trace"][k]["tool_calls"][0].pop("id"), r"needs an 'id'"),
    "response-without-id": (lambda r, k: r["trace"][k + 1].pop("tool_call_id"), r"has no 'tool_call_id'"),
    # a rollout gets a later user turn once the assistant answers: the trace taught a conversation no episode has (the
    # question asked twice, a user speaking before the results were answered)
    "the-question-again-in-the-trace": (lambda r, k: r["trace"].insert(0, dict(r["messages"][-1])),
                                        r"trace\[0\] is a user turn that follows no final answer: a later user turn "
                                        r"comes after an assistant turn without tool calls \(the prompt's user turns go"),
    "a-user-turn-before-the-answer": (lambda r, k: r["trace"].insert(k + 2, {"role": "user", "content": "and then?"}),
                                      r"trace\[\d+\] is a user turn that follows no final answer"),
    # a call as text in the answer (Hermes', Glaive's data) trained as answer text, and read as a call by the rollout
    "a-call-written-as-text": (lambda r, k: r["trace"][-1].update(
        content='<tool_call>\n{"name": "lookup", "arguments": {"entity": "maya"}}\n</tool_call>'),
        r"trace\[\d+\]\.content holds '<tool_call>', a tool call written as text"),
    "a-glaive-call-as-text": (lambda r, k: r["trace"][-1].update(
        content='<functioncall> {"name": "lookup", "arguments": \'{"entity": "maya"}\'}'),
        r"trace\[\d+\]\.content holds '<functioncall>', a tool call written as text"),
    # the response's name and its tool_call_id named two calls: which result belongs to which call, the row does not say
    "response-named-for-another-function": (lambda r, k: r["trace"][k + 1].update(name="add"),
                                            r"trace\[\d+\] is named 'add' but answers call 'call1', of 'lookup'"),
    # a list stopped the load with a TypeError (unhashable), a number said it answered no earlier call
    "response-id-a-list": (lambda r, k: r["trace"][k + 1].update(tool_call_id=["c1"]),
                           r"trace\[\d+\]\.tool_call_id must be a string, the 'id' of the call it answers; got "
                           r"\[\"c1\"\]"),
    "nan-in-arguments-string": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"].update(
        arguments='{"entity": "maya", "relation": NaN}'), r"arguments: NaN is not a JSON number"),
    "surrogate-in-arguments-string": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"].update(
        arguments='{"entity": "m\\ud800", "relation": "home"}'), "lone surrogate"),
    "deep-arguments-string": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"].update(
        arguments='{"entity": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nested too deeply"),
    "float-id": (lambda r, k: r.update(id=1.5), "'id' must be a non-empty string or an integer, got 1.5"),
    "bool-id": (lambda r, k: r.update(id=True), "'id' must be a non-empty string or an integer, got true"),
    # an empty id: every message named the row "(id '')"
    "empty-id": (lambda r, k: r.update(id=" "), "'id' must be a non-empty string or an integer, got \" \""),
    # {} and "" were read as no calls: the error landed on the tool turn after, as an unanswered id
    "tool-calls-object": (lambda r, k: r["trace"][k].update(tool_calls={}), r"tool_calls must be a list, got \{\}"),
    "tool-calls-empty-string": (lambda r, k: r["trace"][k].update(tool_calls=""), "tool_calls must be a list, got \"\""),
    "object-tool-result": (lambda r, k: r["trace"][k + 1].update(content={"x": 1}), "JSON-encode a structured result"),
    "think-inside-the-answer": (lambda r, k: r["trace"][-1].update(content="it is <think>x</think> paris"),
                                "<think> tags other than one leading"),
    # rendered and run as a function, whatever the type said
    "a-tool-of-another-type": (lambda r, k: r["tools"][0].update(type="retrieval"),
                               r"tools\[0\]\.type is 'retrieval'; the tools this format runs are functions"),
    # the built-in tool formats gather every system text in the first turn: it came before the user's question
    "a-system-message-after-the-user": (lambda r, k: r["messages"].append({"role": "system", "content": "be brief"}),
                                        r"messages\[2\] is a system message after a user message"),
    # rendered as `<think> i look </think> it up </think>`: the reasoning ended early, the rest trained as answer text
    "think-inside-the-reasoning": (lambda r, k: r["trace"][k].update(reasoning_content="i look </think> it up"),
                                   r"trace\[\d+\]\.reasoning_content holds a <think> or </think> tag"),
    # the arguments under another name were dropped: the call read as one without arguments (refused only where its
    # schema requires some, as here, with a message about a missing argument)
    "arguments-under-another-name": (lambda r, k: r["trace"][k]["tool_calls"][0]["function"].update(
        input=r["trace"][k]["tool_calls"][0]["function"].pop("arguments")),
        r"trace\[\d+\]\.tool_calls\[0\]\.function has 'input', a key this format does not read"),
    "a-key-of-its-own-on-a-call": (lambda r, k: r["trace"][k]["tool_calls"][0].update(thought="look it up"),
                                   r"trace\[\d+\]\.tool_calls\[0\] has 'thought', a key this format does not read"),
    # normalised to a function call, whatever the type said
    "a-call-of-another-type": (lambda r, k: r["trace"][k]["tool_calls"][0].update(type="code_interpreter"),
                               r"tool_calls\[0\]\.type is 'code_interpreter'; the calls this format runs are functions"),
}


@pytest.mark.parametrize("change, words", CONVERSIONS.values(), ids=CONVERSIONS)
def test_other_conventions_are_refused_not_dropped(change, words):
    with pytest.raises(DataFormatError, match=words):
        parse_example(_edit(change))


def test_parameters_are_read_as_arguments_and_a_leading_think_as_reasoning():
    row, k = _call_turn()
    call = row["trace"][k]["tool_calls"][0]["function"]
    want = dict(call["arguments"])
    call["parameters"] = call.pop("arguments")  # Llama 3.1's name, which the rollout's parser reads too
    answer = row["trace"][-1]
    answer.pop("reasoning_content", None)
    answer["content"], final = f"<think>\nso it is {answer['content']}\n</think>\n\n{answer['content']}", answer["content"]
    ex = parse_example(row)
    assert ex.trace[k]["tool_calls"][0]["function"]["arguments"] == want
    assert ex.trace[-1]["reasoning_content"] == f"so it is {final}" and ex.trace[-1]["content"] == final


def test_tool_responses_out_of_call_order_are_put_in_call_order():
    """Rollouts get a turn's results in call order and templates show no ids: responses in another order (legal
    in OpenAI's format, matched by id) would teach results attached to the wrong calls."""
    row = _good()
    k = next(i for i, m in enumerate(row["trace"]) if m.get("tool_calls"))
    first = row["trace"][k]["tool_calls"][0]
    second = {**first, "id": "c2", "function": {**first["function"], "arguments": dict(first["function"]["arguments"])}}
    row["trace"][k]["tool_calls"].append(second)
    response = row["trace"][k + 1]
    row["trace"].insert(k + 1, {**response, "tool_call_id": "c2", "content": "second"})
    trace = parse_example(row).trace
    assert [trace[k + 1]["tool_call_id"], trace[k + 2]["tool_call_id"]] == [first["id"], "c2"]
    assert trace[k + 2]["content"] == "second"


def test_null_keys_of_other_conventions_and_a_repeated_reasoning_are_read_past():
    """The OpenAI SDK writes "function_call": null on every assistant message; some servers repeat the reasoning
    under "reasoning". Neither carries anything of its own."""
    row, k = _call_turn()
    row["trace"][k].update(function_call=None, reasoning=row["trace"][k].get("reasoning_content"), thinking=None)
    assert not {"function_call", "reasoning", "thinking"} & set(parse_example(row).trace[k])


def test_an_openai_call_with_its_stream_index_and_null_keys_loads():
    """A call as OpenAI's API returns it, accumulated from a stream (its place, "index", and null keys are no unread
    values), answered by a response named for its function."""
    row, k = _call_turn()
    call = row["trace"][k]["tool_calls"][0]
    want = dict(call["function"]["arguments"])
    call.update(index=0, type="function")
    row["trace"][k + 1]["name"] = call["function"]["name"]
    call["function"].update(arguments=json.dumps(want), description=None)
    assert parse_example(row).trace[k]["tool_calls"][0]["function"]["arguments"] == want


def test_a_developer_message_is_a_system_message():
    """OpenAI's reasoning models take the system prompt as role "developer": it was refused as an unknown role."""
    row = _good()
    row["messages"][0]["role"] = "developer"
    assert parse_example(row).messages == _good()["messages"] and row["messages"][0]["role"] == "developer"


def test_a_lone_closing_think_splits_off_the_reasoning():
    """Templates that pre-fill <think> leave only its close in the text (R1 distills, QwQ)."""
    row = _good()
    answer = row["trace"][-1]
    answer.pop("reasoning_content", None)
    final, answer["content"] = answer["content"], f"so it is {answer['content']}\n</think>\n\n{answer['content']}"
    ex = parse_example(row)
    assert ex.trace[-1]["reasoning_content"] == f"so it is {final}" and ex.trace[-1]["content"] == final


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"entity": {}, "relation": {}}, "additionalProperties": {"type": "string"}},
    {"type": "object", "properties": {"entity": {}, "relation": {}}, "patternProperties": {"^c": {}}},
    {"type": "object"}, {},
], ids=["additional-schema", "pattern", "no-properties", "empty"])
def test_schemas_that_allow_other_arguments_allow_them(parameters):
    row, k = _call_turn()
    name = row["trace"][k]["tool_calls"][0]["function"]["name"]
    next(t for t in row["tools"] if t["function"]["name"] == name)["function"]["parameters"] = parameters
    row["trace"][k]["tool_calls"][0]["function"]["arguments"]["city"] = "x"
    assert parse_example(row).trace[k]["tool_calls"][0]["function"]["arguments"]["city"] == "x"


@pytest.mark.parametrize("content, words", [
    (b"\x1f\x8b\x08\x00", "a gzip file: decompress it first"),
    # these said "not UTF-8 (byte 0x80 at column 8)" and the like, not what the file is
    (bz2.compress(json.dumps(_good()).encode()), "a bzip2 file: decompress it first"),
    (lzma.compress(json.dumps(_good()).encode()), "an xz file: decompress it first"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "a zip archive: extract the data file from it"),
    (b"PAR1\x15\x04\x15\x80\x01\x15\x80\x01L", r"a Parquet file: convert it \(datasets"),
    (b"[\n" + json.dumps(_good()).encode() + b"\n]\n", "the line is '\\[' alone: a JSON array or pretty-printed JSON"),
    (("[" + json.dumps(_good()) + "]\n").encode(), "a row must be a JSON object, got list \\(a JSON array file\\? rows are JSONL"),
    # an array written one object per line: it was "invalid JSON: the line ends after column N (...; truncated?)"
    (("[" + json.dumps(_good()) + ",\n" + json.dumps(_good()) + "]\n").encode(),
     "invalid JSON: the file opens a JSON array, not JSONL"),
])
def test_files_that_are_not_jsonl_say_what_they_are(tmp_path, content, words):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=rf"{path}:1: {words}"):
        load_examples(path)


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_good()).encode() + b"\n")
    examples, _ = load_examples(path)
    assert examples[0].id == _good()["id"]
    # on a line of its own it is a blank line, skipped as blank lines are (it was "invalid JSON ... truncated?")
    path.write_bytes(b"\xef\xbb\xbf\r\n" + json.dumps(_good()).encode() + b"\r\n")
    examples, _ = load_examples(path)
    assert [(e.id, e.line) for e in examples] == [(_good()["id"], 2)]


def _multihop(change):
    row = _good()
    change(row)
    return parse_example(row)


# (change to a good multi-hop row, words of check_trainable's refusal): rows that loaded and then crashed mid-run
# (a tool the environment cannot run) or trained RL against SFT (a trace the environment does not reward)
UNTRAINABLE_MULTIHOP = {
    "a-tool-of-the-users": (lambda r: r["tools"].append(
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}),
        "env 'multihop' runs only its own tools .*; the row lists 'get_weather'"),
    # a held-out or grpo row (no trace calls it) showed a spec the environment refuses every call of
    "a-spec-of-other-arguments": (lambda r: r["tools"][1]["function"]["parameters"].update(required=["a"]),
                                  r"the row's spec of 'add' lists the arguments \['a', 'b'\] \(required: \['a'\]\); "
                                  r"env 'multihop' runs add with \['a', 'b'\], all required"),
    "a-list-answer": (lambda r: r.update(answer=[r["answer"]]), "'answer' must be a string or an integer"),
    "a-bool-answer": (lambda r: r.update(answer=False), "'answer' must be a string or an integer"),
    "an-answer-the-trace-does-not-give": (lambda r: r.update(answer="atlantis"),
                                          "the trace's final answer .* does not earn the reward against 'answer' "
                                          "'atlantis'"),
    "another-world": (lambda r: r["env"].update(world_seed=r["env"]["world_seed"] + 5),
                      r"trace\[\d+\] gives 'lookup' the result .*, where the environment \(world \d+\) answers"),
    "a-later-user-turn": (lambda r: r["trace"].extend([{"role": "user", "content": "and then ?"},
                                                       {"role": "assistant", "content": "paris"}]),
                          r"trace\[\d+\] is a later user turn, but env 'multihop' has one user turn"),
    # a typo of world_seed: the task ran in world 0 (a row without a trace, grpo's, earned 0 there without a word)
    "an-env-key-it-does-not-read": (lambda r: r["env"].update(world_sed=3),
                                    "env has 'world_sed', a key env 'multihop' does not read \\(it reads name, "
                                    "world_seed\\)"),
}


@pytest.mark.parametrize("change, words", UNTRAINABLE_MULTIHOP.values(), ids=UNTRAINABLE_MULTIHOP)
def test_multihop_rows_must_replay_to_their_reward(change, words):
    example = _multihop(change)
    with pytest.raises(DataFormatError, match=words):
        check_trainable(example)


@pytest.mark.parametrize("env", [{"name": "multihop", "world_seed": 0}, {"name": "my_envs.weather:WeatherEnv"}])
def test_a_trace_that_ends_before_its_final_answer_is_refused_for_every_environment(env):
    """The expert's calls and their results, then nothing (or a later user turn left unanswered): it taught calling
    tools and never answering, where an episode ends at a final answer. The multi-hop replay caught it; an
    environment of the user's own (its rows checked by its own ``check_example`` alone) trained it."""
    row = {**_good(), "env": env}
    assert row["trace"][-1]["role"] == "assistant" and "tool_calls" not in row["trace"][-1]
    cut = {**row, "trace": row["trace"][:-1]}
    with pytest.raises(DataFormatError, match=rf"the trace ends on trace\[{len(cut['trace']) - 1}\], a tool "
                                              r"response: it ends with the expert's final answer"):
        parse_example(cut)
    asked = {**row, "trace": row["trace"] + [{"role": "user", "content": "and then?"}]}
    with pytest.raises(DataFormatError, match=rf"the trace ends on trace\[{len(row['trace'])}\], a user turn"):
        parse_example(asked)
    assert parse_example(row).trace[-1]["content"] == row["trace"][-1]["content"]


def test_every_built_in_task_replays_to_its_reward():
    from pact_fast.envs import make_tasks

    for hops in (1, 2, 3):
        for t in make_tasks(60, seed=hops, hops=(hops,), n_distractors=2, world_seed=hops, ops=True):
            check_trainable(parse_example(t))


def test_a_listed_tool_the_environment_does_not_have_is_an_error_observation():
    """Before, ``execute`` raised KeyError for a name the row listed but the environment lacks: the run stopped."""
    from pact_fast.envs.multihop import MultiHopEnv
    from pact_fast.toolcalls import ToolCall

    row = _good()
    row["tools"].append({"type": "function", "function": {"name": "get_weather"}})
    env = MultiHopEnv(parse_example(row))
    assert env.step([ToolCall("get_weather", {})]) == ["error : unknown tool get_weather"]


def _bfcl_row(**env):
    """A BFCL row whose trace (``ls()``, answered as the back-end answers it) earns the reward of its ``gold``."""
    from pact_fast.envs.bfcl import BFCLBackends

    row = _good()
    row["tools"] = [{"type": "function", "function": {"name": "ls", "parameters": {
        "type": "object", "properties": {"a": {"type": "boolean"}}}}}]
    listing = BFCLBackends({}, ["GorillaFileSystem"]).execute("ls")
    row["trace"] = [{"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": {}}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": listing},
                    {"role": "assistant", "content": ""}]
    row["answer"] = None
    row["env"] = {"name": "bfcl", "involved_classes": ["GorillaFileSystem"], "initial_config": {}, "user_turns": [],
                  "gold": [["ls()"]], **env}
    return parse_example(row)


@pytest.mark.parametrize("env, words", [
    (dict(involved_classes=None), "needs 'involved_classes', a non-empty list"),
    (dict(involved_classes=["NoSuchAPI"]), "names 'NoSuchAPI', not a BFCL back-end"),
    (dict(initial_config=None), "needs 'initial_config'"),
    (dict(user_turns=[[{"role": "user", "content": "more"}]]), "'user_turns' has 1 later user turns, the trace 0"),
    (dict(gold=None), "needs 'gold'"),
    (dict(gold=[["ls()"], ["pwd()"]]), "'gold' has 2 turns for 1 user turns"),
    (dict(long_contxt=True), "env has 'long_contxt', a key env 'bfcl' does not read"),
], ids=["no-classes", "unknown-class", "no-config", "user-turns", "no-gold", "gold-turns", "unread-key"])
def test_bfcl_rows_need_the_fields_their_back_ends_read(env, words):
    """Before, such rows loaded and the run stopped at the first episode (KeyError), or the first one scored."""
    pytest.importorskip("bfcl_eval")
    check_trainable(_bfcl_row(), needs_trace=False)  # the good one passes
    with pytest.raises(DataFormatError, match=words):
        check_trainable(_bfcl_row(**env), needs_trace=False)


def test_bfcl_rows_without_bfcl_eval_installed_are_refused_even_when_skipping_rows(tmp_path, monkeypatch):
    """The missing package is the same for every BFCL row: with data.on_error=skip a file of multi-hop and BFCL rows
    trained on the multi-hop ones alone, the BFCL ones counted among the skipped."""
    import sys

    from pact_fast.data import DataSetupError

    pytest.importorskip("bfcl_eval")
    rows = [_good(), {**_bfcl_row().to_json(), "id": "bfcl-0"}]
    monkeypatch.setitem(sys.modules, "bfcl_eval.constants.executable_backend_config", None)  # import fails
    write_examples(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataSetupError, match=r"mixed.jsonl:2: env 'bfcl' needs the bfcl-eval package"):
        load_examples(tmp_path / "mixed.jsonl", on_error="skip", check=check_trainable)


def test_an_empty_system_prompt_is_allowed():
    row = _good()
    row["messages"][0]["content"] = ""
    assert parse_example(row).messages[0]["content"] == ""


def test_a_data_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A file the user may not read (its mode, as root cannot show here) stopped the command with a PermissionError
    traceback."""
    from pathlib import Path

    path = tmp_path / "rows.jsonl"
    write_examples(path, [_good()])

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataFormatError, match=rf"^{path}: cannot be read \(Permission denied\)$"):
        load_examples(path)


def test_a_pipe_as_the_data_file_is_refused_as_one_not_as_missing(tmp_path):
    """``--data <(zcat rows.jsonl.gz)`` (what a user does once a gzip file is refused) was refused as "no such
    file", of a path that exists; a pipe reads once, where a resume and ``pact-fast eval --run`` read it again."""
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileNotFoundError, match=rf"^data.path={fifo}: not a regular file \(a pipe, .*give a JSONL "
                                                r"file$"):
        load_data(_split_config(fifo))
