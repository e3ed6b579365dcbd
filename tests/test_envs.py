import os
import time

import pytest

from pact_fast.data import parse_example
from pact_fast.envs import build_tokenizer, make_task, make_tasks
from pact_fast.envs.multihop import MultiHopEnv, World, execute, normalise_answer
from pact_fast.envs.sandbox import Sandbox, SandboxTimeout
from pact_fast.toolcalls import ToolCall, ToolCallError, parse_tool_calls


def test_tasks_are_deterministic_from_the_seed():
    assert make_tasks(20, seed=3) == make_tasks(20, seed=3)
    assert make_tasks(20, seed=3) != make_tasks(20, seed=4)
    assert World.sample(1).facts == World.sample(1).facts


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("distractors", [0, 2])
def test_every_expert_trace_reaches_reward_one(hops, distractors):
    for seed in range(40):
        ex = parse_example(make_task(seed, hops=hops, n_distractors=distractors))
        env = MultiHopEnv(ex, format_reward=0.1)
        calls_made = 0
        for m in ex.trace:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
                responses = env.step(calls)
                calls_made += len(calls)
            elif m["role"] == "tool":
                assert m["content"] == responses[0], "the trace's tool response is what the environment returns"
        final = ex.trace[-1]
        assert env.reward(f"<think> x </think> {final['content']} <|im_end|>") == pytest.approx(1.1)
        assert env.reward("<think> x </think> wrong <|im_end|>") == pytest.approx(0.1)
        assert calls_made >= hops
        assert len(ex.tools) == 3 + distractors


def test_malformed_calls_become_error_observations():
    ex = parse_example(make_task(0, hops=1))
    env = MultiHopEnv(ex)
    out = env.step([ToolCallError("x (", "bad"), ToolCall("fly", {}), ToolCall("lookup", {"entity": "maya"}),
                    ToolCall("add", {"a": "two", "b": 1}), ToolCall("lookup", {"entity": "nobody", "relation": "age"})])
    assert all(o.startswith("error") for o in out)
    assert env.errors == 5
    assert env.reward(ex.answer) == 1.0  # errors cost only the format bonus (0 here)
    # a sum past Python's 4300-digit int-to-string limit raised a ValueError that stopped the run
    big = int("9" + "0" * 4299)
    assert env.step([ToolCall("add", {"a": big, "b": big})]) == ["error : the result has too many digits"]
    assert env.errors == 6


def test_tools_never_eval_model_text():
    world = World.sample(0)
    payload = "__import__('os').system('echo hacked')"
    with pytest.raises(Exception, match="unknown entity"):
        execute(world, "lookup", {"entity": payload, "relation": "age"}, {"lookup"})
    with pytest.raises(Exception, match="number"):
        execute(world, "add", {"a": payload, "b": 1}, {"add"})


def test_parsers():
    calls = parse_tool_calls("<tool_call> add ( a = 1 2 , b = 3 ) </tool_call> <tool_call> ( ) </tool_call>")
    assert calls[0] == ToolCall("add", {"a": 12, "b": 3})
    assert isinstance(calls[1], ToolCallError)
    hermes = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{x</tool_call>',
                              "hermes")
    assert hermes[0] == ToolCall("f", {"x": 1}) and isinstance(hermes[1], ToolCallError)
    assert isinstance(parse_tool_calls("<tool_call> lookup ( entity = a")[-1], ToolCallError)
    with pytest.raises(ValueError, match="format"):
        parse_tool_calls("x", "xml")


def test_tokenizer_covers_every_task_text():
    tok = build_tokenizer()
    for t in make_tasks(50, seed=1, hops=(1, 2, 3), n_distractors=3):
        ex = parse_example(t)
        text = tok.apply_chat_template(ex.messages + ex.trace, tools=ex.tools, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert normalise_answer(tok.decode(tok(ex.answer, add_special_tokens=False)["input_ids"])) == \
            normalise_answer(ex.answer)


def test_ops_knob_controls_the_final_operation():
    def tools_used(tasks):
        return {c["function"]["name"] for t in tasks for m in parse_example(t).trace for c in m.get("tool_calls", [])}

    assert tools_used(make_tasks(40, seed=2, hops=(1, 2), ops=False)) == {"lookup"}
    assert {"lookup", "add", "initial"} <= tools_used(make_tasks(80, seed=2, hops=(1, 2), ops=True))


class _Counter:
    """A deterministic stateful object for the sandbox tests."""

    def __init__(self, start):
        self.n = start

    def add(self, k):
        self.n += k
        return self.n

    def power(self, base, exponent):
        return base ** exponent  # one C operation that holds the GIL: only killing the process stops it

    def fail(self):
        raise KeyError("no such key")

    def exit(self, code):
        os._exit(code)  # a back-end that ends its process (a crash, a sys.exit in C code)

    def value(self):
        return self.n


class _LoadSensitive:
    """A deterministic back-end whose ``inc`` takes 2 s while ``flag`` exists (a machine under load)."""

    def __init__(self, flag):
        self.flag, self.n = flag, 0

    def inc(self):
        if os.path.exists(self.flag):
            time.sleep(2)
        self.n += 1
        return self.n

    def hang(self):
        time.sleep(100)


def test_a_sandbox_whose_replay_overran_refuses_every_later_call(tmp_path):
    """After a replay overran, the next call built a fresh object and answered as if the completed calls never
    ran (state 0 after three increments), and the episode went on, rewarded, on it: every later call is an
    error now."""
    flag = tmp_path / "busy"
    sandbox = Sandbox(_LoadSensitive, (str(flag),), timeout=1.0)
    try:
        assert [sandbox.call("inc") for _ in range(3)] == [1, 2, 3]
        flag.touch()
        with pytest.raises(RuntimeError, match="state is lost"):
            sandbox.call("hang")  # times out; replaying the three incs now overruns
        flag.unlink()
        with pytest.raises(RuntimeError, match="state is lost"):
            sandbox.call("inc")
    finally:
        sandbox.close()
    assert sandbox.call("inc") == 1, "close() starts over from factory(*args)"
    sandbox.close()


def test_a_call_that_ends_the_back_ends_process_is_said_as_such_and_the_state_kept():
    """A back-end that died in a call (os._exit, a crash) was reported as having run past the time limit: the
    model read a time-out for what was a crash."""
    sandbox = Sandbox(_Counter, (10,), timeout=5.0)
    try:
        assert sandbox.call("add", 2) == 12
        with pytest.raises(RuntimeError, match=r"^exit ended the back-end's process \(exit code 3\)"):
            sandbox.call("exit", 3)
        assert sandbox.restarts == 1 and sandbox.call("value", record=False) == 12
    finally:
        sandbox.close()


def test_sandbox_stops_an_overrunning_call_and_restores_the_state():
    sandbox = Sandbox(_Counter, (10,), timeout=1.0)
    assert sandbox.call("add", 2) == 12 and sandbox.call("add", 3) == 15
    first = sandbox.process
    start = time.perf_counter()
    with pytest.raises(SandboxTimeout, match="power ran past the time limit of 1 s"):
        sandbox.call("power", 10, 100_000_000)
    assert time.perf_counter() - start < 10.0
    first.join(timeout=5)
    assert not first.is_alive(), "the overrunning child is killed"
    assert sandbox.restarts == 1 and sandbox.call("value", record=False) == 15, "completed calls were replayed"
    with pytest.raises(RuntimeError, match="KeyError: 'no such key'"):
        sandbox.call("fail")
    assert sandbox.call("add", 1) == 16 and sandbox.restarts == 1
    child = sandbox.process
    sandbox.close()
    child.join(timeout=5)
    assert not child.is_alive()
    assert sandbox.call("value") == 10, "after close a call starts from factory(*args)"
    sandbox.close()
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(_Counter, (0,), timeout=0)


def test_a_ctrl_c_is_the_trainers_not_the_sandboxed_back_ends():
    """A forked child inherited the trainer's Ctrl-C handler: on Ctrl-C (sent to the whole process group by a
    terminal) every BFCL worker printed the trainer's "saving a checkpoint" line and died with a traceback."""
    import signal

    def handler(signum, frame):
        raise RuntimeError("the trainer's handler ran in the child")

    previous = signal.signal(signal.SIGINT, handler)
    sandbox = Sandbox(_Counter, (10,), timeout=5.0)
    try:
        assert sandbox.call("add", 1) == 11
        os.kill(sandbox.process.pid, signal.SIGINT)
        time.sleep(0.5)
        assert sandbox.process.is_alive() and sandbox.call("add", 1) == 12 and sandbox.restarts == 0
    finally:
        sandbox.close()
        signal.signal(signal.SIGINT, previous)


def test_a_sigterm_ends_a_sandboxed_back_end_not_the_trainers_handler_in_it():
    """The trainer handles SIGTERM as a Ctrl-C; a forked child that inherited that handler outlived the SIGTERM
    multiprocessing sends its daemon children at the parent's exit (whose join then waited for it)."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler that returns, as the trainer's
    sandbox = Sandbox(_Counter, (10,), timeout=5.0)
    try:
        assert sandbox.call("add", 1) == 11
        child = sandbox.process
        child.terminate()
        child.join(timeout=5)
        assert child.exitcode == -signal.SIGTERM
    finally:
        sandbox.close()
        signal.signal(signal.SIGTERM, previous)


def test_demo_shows_the_main_jobs_one_hop_tasks(capsys):
    from pact_fast.envs.__main__ import demo

    demo(n_tasks=2, seed=4)
    out = capsys.readouterr().out
    assert out.count("(1 hop)") == 2 and "hops)" not in out
    assert out.count("call: lookup(") == 2  # one look-up per task, no add / initial step (data.ops=false)


def test_calls_are_read_after_the_reasoning_in_linear_time_and_numbers_are_whole():
    """A call written inside <think> was executed; 40k unclosed <tool_call> tags took seconds to parse (a lazy
    regex from every tag to the end); a nested tag counted twice; Llama 3.1's "parameters" key was dropped (the
    call ran without arguments); add(a=3.9) ran as 3 and a=true as 1."""
    thought = "<think>\n<tool_call> lookup ( entity = maya , relation = age ) </tool_call>\n</think>\nno call"
    assert parse_tool_calls(thought, "compact") == []
    start = time.perf_counter()
    calls = parse_tool_calls("<tool_call> x" * 40_000, "compact")
    assert time.perf_counter() - start < 1.0 and len(calls) == 1 and "unclosed" in calls[0].reason
    assert len(parse_tool_calls("<tool_call><tool_call>x</tool_call>", "compact")) == 1
    (call,) = parse_tool_calls('<tool_call>{"name": "lookup", "parameters": {"entity": "maya"}}</tool_call>', "hermes")
    assert call == ToolCall("lookup", {"entity": "maya"})
    env = MultiHopEnv(parse_example(make_task(0, hops=1)))
    assert env.step([ToolCall("add", {"a": 3.9, "b": 1}), ToolCall("add", {"a": True, "b": 1}),
                     ToolCall("add", {"a": 3.0, "b": 1})]) == ["error : a must be a whole number"] * 2 + ["4"]


def test_a_turn_runs_at_most_max_calls_per_turn_calls():
    """A turn of many calls ran every one (on BFCL each up to rollout.call_timeout, serially): past the cap they
    are error observations, not run."""
    env = MultiHopEnv(parse_example(make_task(0, hops=1)), max_calls_per_turn=2)
    out = env.step([ToolCall("add", {"a": k, "b": 1}) for k in range(4)])
    assert out[:2] == ["1", "2"] and out[2:] == ["error : not run: more than 2 tool calls in one turn"] * 2
    assert env.errors == 2
