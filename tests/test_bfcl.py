"""BFCL multi-turn (bfcl-eval, installed with --no-deps): conversion, safe replay, environment."""
import uuid

import pytest

from pact_fast.data import parse_example
from pact_fast.envs.bfcl import BFCLBackends, BFCLEnv, load_bfcl, parse_call
from pact_fast.toolcalls import ToolCall


@pytest.fixture(scope="module")
def base():
    return load_bfcl("multi_turn_base")


def test_every_gold_trace_replays_like_bfcls_own_executor(base):
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import state_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    assert len(base) == 200
    for ex in base:
        spec = ex.env
        ours = BFCLBackends(spec["initial_config"], spec["involved_classes"])
        run = f"pactfast_{uuid.uuid4().hex}"
        theirs = None
        for turn in spec["gold"]:
            expected, theirs = execute_multi_turn_func_call(turn, spec["initial_config"], spec["involved_classes"],
                                                            run, ex.id)
            got = [ours.execute_string(call) for call in turn]
            assert got == expected, ex.id
            assert not any(r.startswith("Error during execution") for r in got), (ex.id, got)
        assert state_checker(ours.instances, theirs)["valid"], ex.id


def test_examples_follow_the_data_format(base):
    for ex in base[:40]:
        assert parse_example(ex.to_json()).to_json() == ex.to_json()
        roles = [m["role"] for m in ex.trace]
        assert roles.count("user") == len(ex.env["user_turns"])
        assert all(m["role"] in ("system", "user") for m in ex.messages)
        names = {t["function"]["name"] for t in ex.tools}
        assert {c["function"]["name"] for m in ex.trace for c in m.get("tool_calls", [])} <= names


def test_environment_hands_over_user_turns_and_scores_the_end_state(base):
    ex = base[0]
    env = BFCLEnv(ex)
    users = 0
    for m in ex.trace:
        if m["role"] == "assistant" and m.get("tool_calls"):
            c = m["tool_calls"][0]["function"]
            env.step([ToolCall(c["name"], c["arguments"])])
        elif m["role"] == "assistant":
            nxt = env.next_user_turn()
            users += nxt is not None
    assert users == len(ex.env["user_turns"]) and env.next_user_turn() is None
    assert env.reward("") == 1.0
    env.step([ToolCall("mkdir", {"dir_name": "not_in_gold"})])
    assert env.reward("") == 0.0
    assert env.step([ToolCall("no_such_tool", {})])[0].startswith("Error during execution")


@pytest.mark.parametrize("text", ["__import__('os').system('echo x')", "os.system('x')", "f(x=open('a'))",
                                  "f(**{'a': 1})", "cd(folder=name)", "not a call"])
def test_call_strings_are_parsed_never_evaluated(text):
    with pytest.raises(ValueError):
        parse_call(text)


def test_parse_call_reads_literals():
    assert parse_call("sort('a.txt')") == ("sort", ["a.txt"], {})
    assert parse_call("f(a=-1, b=[1, 'x'], c={'k': None}, d=True)") == (
        "f", [], {"a": -1, "b": [1, "x"], "c": {"k": None}, "d": True})
