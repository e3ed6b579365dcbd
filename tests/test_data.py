import json
import re

import pytest

from pact_fast.data import DataFormatError, load_examples, parse_example, write_examples
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


def test_a_file_of_only_bad_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{}\n")
    with pytest.raises(DataFormatError, match="no valid rows"):
        load_examples(path, on_error="skip")
