"""BFCL multi-turn (bfcl-eval, installed with --no-deps): conversion, safe replay, environment."""
import re
import time
import uuid

import pytest

from pact_fast.data import DataFormatError, load_examples, parse_example, write_examples
from pact_fast.envs.bfcl import CATEGORIES, BFCLBackends, BFCLEnv, load_bfcl, parse_call
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
    # most back-ends report a failed call as {"error": ...}: counted as a tool error, as raised ones are
    before = env.errors
    assert '"error"' in env.step([ToolCall("cd", {"folder": "no_such_dir"})])[0]
    assert env.errors == before + 1


@pytest.mark.parametrize("text", ["__import__('os').system('echo x')", "os.system('x')", "f(x=open('a'))",
                                  "f(**{'a': 1})", "cd(folder=name)", "not a call"])
def test_call_strings_are_parsed_never_evaluated(text):
    with pytest.raises(ValueError):
        parse_call(text)


def test_parse_call_reads_literals():
    assert parse_call("sort('a.txt')") == ("sort", ["a.txt"], {})
    assert parse_call("f(a=-1, b=[1, 'x'], c={'k': None}, d=True)") == (
        "f", [], {"a": -1, "b": [1, "x"], "c": {"k": None}, "d": True})


# ---------------------------------------------------------------- every multi-turn category

EXPECTED_ENTRIES = {"multi_turn_base": 200, "multi_turn_miss_func": 199, "multi_turn_miss_param": 200,
                    "multi_turn_long_context": 200}


@pytest.fixture(scope="module")
def categories():
    from pact_fast.data import LoadReport

    out = {}
    for category in CATEGORIES:
        report = LoadReport(category)
        out[category] = (load_bfcl(category, on_error="skip", report=report), report)
    return out


def test_every_category_loads_and_only_the_inconsistent_entry_is_skipped(categories):
    assert set(categories) == set(EXPECTED_ENTRIES)
    for category, (examples, report) in categories.items():
        assert len(examples) == EXPECTED_ENTRIES[category], category
        assert len({ex.id for ex in examples}) == len(examples)
    assert categories["multi_turn_miss_func"][1].skipped == [
        ("multi_turn_miss_func_49", "gold turn 1 calls 'tail', which BFCL holds back until turn 3")]
    with pytest.raises(DataFormatError, match="entry multi_turn_miss_func_49: gold turn 1 calls 'tail'"):
        load_bfcl("multi_turn_miss_func")


@pytest.mark.parametrize("category", CATEGORIES)
def test_write_read_round_trip(categories, category, tmp_path):
    examples = categories[category][0]
    path = tmp_path / f"{category}.jsonl"
    write_examples(path, examples)
    again, report = load_examples(path)
    assert report.loaded == len(examples) and not report.skipped
    assert [e.to_json() for e in again] == [e.to_json() for e in examples]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_trace_replays_through_the_environment_to_reward_one(categories, category):
    """The trace (not BFCL's gold strings): its calls carry the gold arguments, the environment answers
    each with the trace's response, hands over the trace's user turns, and ends in BFCL's gold state by
    our reward and by BFCL's own state_checker."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import state_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    for ex in categories[category][0]:
        spec = ex.env
        gold_calls = [parse_call(c) for turn in spec["gold"] for c in turn]
        trace_calls = [c["function"] for m in ex.trace for c in m.get("tool_calls", [])]
        assert [c["name"] for c in trace_calls] == [name for name, _, _ in gold_calls], ex.id
        for call, (_, args, kwargs) in zip(trace_calls, gold_calls):
            assert kwargs.items() <= call["arguments"].items() and len(call["arguments"]) == len(args) + len(kwargs)
        env = BFCLEnv(ex)
        for i, m in enumerate(ex.trace):
            if m["role"] == "assistant" and m.get("tool_calls"):
                c = m["tool_calls"][0]["function"]
                assert env.step([ToolCall(c["name"], c["arguments"])]) == [ex.trace[i + 1]["content"]], (ex.id, i)
            elif m["role"] == "assistant":
                expected = ex.trace[i + 1]["content"] if i + 1 < len(ex.trace) else None
                assert env.next_user_turn() == expected, (ex.id, i)
        assert env.errors == sum(m["content"].startswith("Error during execution") for m in ex.trace
                                 if m["role"] == "tool")
        assert env.reward("") == 1.0, ex.id
        run, theirs = f"pactfast_{uuid.uuid4().hex}", None  # one run name: BFCL keeps its instances across turns
        for turn in spec["gold"]:
            _, theirs = execute_multi_turn_func_call(turn, spec["initial_config"], spec["involved_classes"], run,
                                                     ex.id, long_context=spec["long_context"])
        assert state_checker(env.instances(), theirs)["valid"], ex.id
        env.close()


def test_trace_arguments_are_not_shared_with_the_backends(categories):
    """Back-ends keep the lists they are given; a later call used to change an earlier call's arguments."""
    by_id = {ex.id: ex for ex in categories["multi_turn_base"][0]}
    for entry in ("multi_turn_base_90", "multi_turn_base_147"):
        ex = by_id[entry]
        trace_calls = [c["function"] for m in ex.trace for c in m.get("tool_calls", [])]
        gold = [parse_call(c) for turn in ex.env["gold"] for c in turn]
        assert [c["arguments"] for c in trace_calls if c["name"] == "post_tweet"] == [
            kw for name, _, kw in gold if name == "post_tweet"]
    tweet = [c["function"]["arguments"] for m in by_id["multi_turn_base_90"].trace for c in m.get("tool_calls", [])
             if c["function"]["name"] == "post_tweet"]
    assert tweet[0]["mentions"] == ["@TravelBuddy"]


def test_miss_func_holds_functions_back_until_bfcl_reveals_them(categories):
    from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC

    for ex in categories["multi_turn_miss_func"][0]:
        revealed = ex.env["revealed_tools"]
        held = {n for names in revealed.values() for n in names}
        assert held and not held & {t["function"]["name"] for t in ex.tools}, ex.id
        reveal_msgs = [m for m in ex.trace if m["role"] == "user" and "tools" in m]
        assert [[t["function"]["name"] for t in m["tools"]] for m in reveal_msgs] == list(revealed.values())
        assert all(m["content"].endswith(DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC) for m in reveal_msgs)
    ex = categories["multi_turn_miss_func"][0][0]  # sort is held back until turn 3
    assert ex.env["revealed_tools"] == {"3": ["sort"]}
    env = BFCLEnv(ex)
    call = ToolCall("sort", {"file_name": "final_report.pdf"})
    for turn in range(1, 3):
        assert env.step([call]) == ["Error during execution: unknown function sort"], turn
        assert env.next_user_turn() == ex.env["user_turns"][turn - 1][0]["content"]
    assert env.step([call]) == ["Error during execution: unknown function sort"]
    assert "sort" in env.next_user_turn()  # turn 3 reveals it
    assert not env.step([call])[0].startswith("Error during execution")
    env.close()


@pytest.mark.parametrize("key, value, words", [
    ("long_context", "false", "env 'long_context' is 'false': expected true or false"),
    ("revealed_tools", {"0": ["sort"]}, "env 'revealed_tools' is .*: expected an object of later user turns"),
    ("revealed_tools", {"3": "sort"}, "env 'revealed_tools' is"),
    ("gold", [["lss()"], [], [], [], []], "env 'gold' turn 0 calls 'lss', not a function of TwitterAPI, Gorilla"),
    ("gold", [["ls("], [], [], [], []], "env 'gold' turn 0: not a call: 'ls\\('"),
    ("initial_config", {"GorillaFileSystem": {"root": 5}}, "env 'initial_config' does not load into TwitterAPI, "
                                                           "GorillaFileSystem: AttributeError: \"'int' object"),
], ids=["long-context-text", "reveal-at-the-prompt", "reveal-not-a-list", "gold-unknown-function", "gold-not-a-call",
        "config-that-does-not-load"])
def test_a_row_whose_environment_settings_would_be_misread_is_refused(key, value, words):
    """"false" loaded the long back-ends (bool("false") is True); functions revealed at turn 0 (or past the last
    turn) stayed unknown to every call of every episode, without a word; a gold call of no function has an error
    text for its result, which paid an episode that made the same wrong call; a configuration the back-ends cannot
    load had every call answered "ran past the time limit" and the reward raise."""
    from pact_fast.envs.bfcl import check_example

    (ex,) = load_bfcl("multi_turn_miss_func", limit=1)
    assert check_example(ex) is None
    ex.env[key] = value
    assert re.match(words, check_example(ex))


def test_a_row_whose_later_user_turns_differ_from_its_traces_is_refused():
    """A hand-written row whose trace says one later user turn and env.user_turns another: the SFT term trained on
    the trace's text while every episode got the other (only their count was compared)."""
    from pact_fast.envs.bfcl import check_example

    (ex,) = load_bfcl("multi_turn_base", limit=1)
    assert check_example(ex) is None
    turn = ex.env["user_turns"][0]
    turn[-1] = {**turn[-1], "content": "Now delete every file instead."}
    assert re.match(r"env 'user_turns' turn 1 reads .*Now delete every file instead\..*, the trace's user turn ",
                    check_example(ex))
    ex.env["user_turns"][0] = ["not a message"]
    assert check_example(ex).startswith("env 'bfcl' needs 'user_turns', a list with the messages")


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_converted_row_passes_the_check_that_its_trace_earns_the_reward(categories, category):
    from pact_fast.envs.bfcl import check_example

    assert [(ex.id, check_example(ex)) for ex in categories[category][0] if check_example(ex)] == []


@pytest.mark.parametrize("edit, words", [
    ("dropped-call", r"the trace's calls do not earn the reward: user turn 3's gold result .* is not among the "
                     r"results so far$"),
    ("response", r"trace\[1\] gives 'cd' the result 'something else', where the back-ends answer "),
    ("blank-user", r"env 'bfcl' needs 'user_turns', .* none of them blank"),
])
def test_a_row_whose_trace_does_not_earn_the_reward_is_refused(edit, words):
    """A hand-edited row whose trace leaves out a gold call (or says another result than the back-ends give)
    loaded: the SFT term taught that call while every episode making it earned 0 (the multi-hop
    environment refused such a trace; BFCL's checked only the env fields). A blank later user turn went to the
    episode as an empty turn (the rollout now refuses it: None ends an episode)."""
    from pact_fast.envs.bfcl import check_example

    (ex,) = load_bfcl("multi_turn_base", limit=1)
    assert check_example(ex) is None and ex.trace[0]["tool_calls"][0]["function"] == {
        "name": "cd", "arguments": {"folder": "document"}}
    if edit == "dropped-call":  # the trace's last call (diff, which reads) and its response
        last = max(i for i, m in enumerate(ex.trace) if m.get("tool_calls"))
        del ex.trace[last:last + 2]
    elif edit == "response":
        ex.trace[1]["content"] = "something else"
    else:
        ex.env["user_turns"][0] = [{"role": "user", "content": " "}]
    assert re.match(words, check_example(ex)), check_example(ex)


def test_a_trace_calling_a_function_before_its_env_reveals_it_is_refused():
    """env.revealed_tools says when an episode may call a held-back function: a trace that calls it a turn earlier
    (its user turn's tools reveal it there) taught a call every episode got answered "unknown function"."""
    from pact_fast.envs.bfcl import check_example

    (ex,) = load_bfcl("multi_turn_miss_func", limit=1)
    assert ex.env["revealed_tools"] == {"3": ["sort"]} and check_example(ex) is None
    ex.env["revealed_tools"] = {"4": ["sort"]}
    assert re.match(r"trace\[\d+\] gives 'sort' the result .*, where the back-ends answer 'Error during execution: "
                    r"unknown function sort'$", check_example(ex)), check_example(ex)


def test_miss_param_traces_close_the_turn_without_a_call(categories):
    for ex in categories["multi_turn_miss_param"][0]:
        empty = [t for t, calls in enumerate(ex.env["gold"]) if not calls and t + 1 < len(ex.env["gold"])]
        assert empty, ex.id
        users = [i for i, m in enumerate(ex.trace) if m["role"] == "user"]
        for t in empty:  # the turn's user message (or the prompt) is followed directly by the closing turn
            at = users[t - 1] + 1 if t else 0
            assert ex.trace[at] == {"role": "assistant", "content": ""}, (ex.id, t)


def test_long_context_backends_are_loaded_long(categories):
    ex = categories["multi_turn_long_context"][0][0]
    assert ex.env["long_context"] is True
    env = BFCLEnv(ex)
    long = env.instances()
    short = BFCLBackends(ex.env["initial_config"], ex.env["involved_classes"]).instances
    assert any(vars(long[name]) != vars(short[name]) for name in short)
    env.close()


# ---------------------------------------------------------------- hostile model output

HOSTILE_CALLS = {
    "unary-minus": "f(x=" + "-" * 100_000 + "1)",
    "attribute-chain": "a" + ".b" * 100_000 + "()",
    "nesting": "f(x=" + "(" * 10_000 + ")" * 10_000 + ")",
    "nesting-under-cap": "f(x=" + "[" * 4_000 + "]" * 4_000 + ")",
    "minus-under-cap": "f(x=" + "-" * 9_000 + "1)",
    "digits": "f(x=" + "7" * 5_000 + ")",
}


@pytest.mark.parametrize("text", list(HOSTILE_CALLS.values()), ids=list(HOSTILE_CALLS))
def test_hostile_call_strings_are_short_errors(text):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        parse_call(text)
    assert len(str(info.value)) < 300, "the message does not echo the input"
    backends = BFCLBackends({}, ["MathAPI"])
    out = backends.execute_string(text)
    assert out.startswith("Error during execution") and len(out) < 300
    assert time.perf_counter() - start < 5.0


def test_a_call_past_the_time_limit_is_stopped_and_the_state_kept(base):
    ex = next(e for e in base if "MathAPI" in e.env["involved_classes"] and "GorillaFileSystem" in
              e.env["involved_classes"])
    env = BFCLEnv(ex, call_timeout=1.0)
    assert env.step([ToolCall("mkdir", {"dir_name": "kept"})]) == ["None"]
    start = time.perf_counter()
    out = env.step([ToolCall("power", {"base": 10, "exponent": 100_000_000})])
    assert time.perf_counter() - start < 10.0
    assert out == ["Error during execution: power ran past the time limit of 1 s"] and env.errors == 1
    assert env.sandbox.restarts == 1
    assert "kept" in env.step([ToolCall("ls", {})])[0], "the completed calls were replayed"
    assert env.step([ToolCall("power", {"base": 2, "exponent": 10})]) == ['{"result": 1024}']
    env.close()


def test_oversized_arguments_and_results_become_error_observations(base):
    env = BFCLEnv(base[0], max_result_chars=30)
    out = env.step([ToolCall("mkdir", {"dir_name": "x" * 20_000}), ToolCall("mkdir", {"dir_name": [[[[1]]]] * 1}),
                    ToolCall("cd", {"folder": _deep(100)}), ToolCall("ls", {})])
    assert out[0] == "Error during execution: arguments of mkdir are longer than the limit of 10000 characters"
    assert out[2] == "Error during execution: arguments of cd are nested deeper than 32 levels"
    assert out[3].startswith("Error during execution: the result of ls has") and len(out[3]) < 200
    assert all(o.startswith("Error during execution") for o in out) and env.errors == 4
    env.close()


def _deep(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_an_episode_that_makes_no_call_is_not_paid_for_a_read_only_task(base):
    """multi_turn_base_13's gold calls (cd, tail, diff) change no back-end: the state check alone paid 1.0 to an
    episode that never called a tool (11 of 200 base tasks). BFCL's response check, every gold result of a turn
    among the episode's results so far, is part of the reward now."""
    ex = next(e for e in base if e.id == "multi_turn_base_13")
    idle = BFCLEnv(ex)
    try:
        gold, results = idle.gold_state()
        start = idle.instances()
        assert all(vars(start[n])[a] == v for n, inst in gold.instances.items() for a, v in vars(inst).items()
                   if not a.startswith("_")), "the task's gold state is its start state"
        assert any(results)
        while idle.next_user_turn() is not None:
            pass
        assert idle.reward("") == 0.0
    finally:
        idle.close()
