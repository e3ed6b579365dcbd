"""Environments of the user's own (``env.name`` = ``"module:Class"``, ``pact_fast.envs.plugin``): they train from a
data file through the command, are checked when the data loads, and are held to their contract at run time."""
import json
import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from pact_fast.data import DataFormatError, load_examples, parse_example
from pact_fast.envs import build_tokenizer, make_env_factory, make_task
from pact_fast.envs.base import ToolEnvError
from pact_fast.rollout import HFRolloutEngine, RolloutConfig

HERE = Path(__file__).resolve().parent

# A user's module: a multi-hop world whose reward is scaled (0.25 + 0.5 * correct, so the run's rewards show whose
# reward it is), logging every call and reward to the file the row names, and classes that break the contract.
MODULE = '''
import json
import math

from pact_fast.envs.base import ToolEnv
from pact_fast.envs.multihop import MultiHopEnv


class Scaled(MultiHopEnv):
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.log = example.env["log"]
        print("episode of", example.id)  # a debugging print: stdout is the command's JSON summary all the same

    def run_call(self, name, arguments):
        text, ok = super().run_call(name, arguments)
        with open(self.log, "a") as f:
            f.write(json.dumps({"call": name, "ok": ok}) + "\\n")
        return text, ok

    def reward(self, final_text):
        reward = 0.25 + 0.5 * super().reward(final_text)
        with open(self.log, "a") as f:
            f.write(json.dumps({"reward": reward}) + "\\n")
        return reward

    @staticmethod
    def check_example(example):
        return None if "log" in example.env else "env needs a 'log' file"


class NotAnEnv:
    pass


class NoReward(ToolEnv):
    def run_call(self, name, arguments):
        return "x", True


class FixedInit(MultiHopEnv):
    def __init__(self, example):
        super().__init__(example)


class Raises(MultiHopEnv):
    def run_call(self, name, arguments):
        return {}[name]


class Untupled(MultiHopEnv):
    def run_call(self, name, arguments):
        return "a bare text"


class TextFlag(MultiHopEnv):
    def run_call(self, name, arguments):
        return "error : the service is down", "False"


class StepRaises(MultiHopEnv):
    def step(self, calls):
        raise KeyError("session")


class StepDropsCalls(MultiHopEnv):
    def step(self, calls):
        return super().step(calls)[1:]


class StepBytes(MultiHopEnv):
    def step(self, calls):
        return [text.encode() for text in super().step(calls)]


class PopsUserTurns(Scaled):
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.later = example.env["later"]

    def next_user_turn(self):
        return self.later.pop(0) if self.later else None


class EchoingUser(MultiHopEnv):
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.asked = False

    def next_user_turn(self):  # a simulated user quoting what the model wrote: a lone surrogate from its JSON
        if self.asked:
            return None
        self.asked = True
        return "what is \\ud800 ?"


class NanReward(MultiHopEnv):
    def reward(self, final_text):
        return math.nan


class HugeReward(MultiHopEnv):
    def reward(self, final_text):
        return 1e300


class NoneReward(MultiHopEnv):
    def reward(self, final_text):
        return None


class ListUser(MultiHopEnv):
    def next_user_turn(self):
        return ["not", "text"]


class BlankUser(MultiHopEnv):
    def next_user_turn(self):  # meant as "no more turns": every episode went on to its turn limit, reward 0
        return ""


class ExitingCall(MultiHopEnv):
    def run_call(self, name, arguments):  # a command-line tool's main() wrapped as a tool: it ends in sys.exit
        raise SystemExit(0)


class ExitingCheck(MultiHopEnv):
    @staticmethod
    def check_example(example):
        raise SystemExit("usage: check ROW")


class BadCheck(MultiHopEnv):
    @staticmethod
    def check_example(example):
        return False


class RaisingCheck(MultiHopEnv):
    @staticmethod
    def check_example(example):
        return example.env["city"]


class InstanceCheck(MultiHopEnv):
    def check_example(self, example):
        return None


class RaisingInit(MultiHopEnv):
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.city = example.env["city"]


class DropsCaps(MultiHopEnv):
    def __init__(self, example, **caps):
        super().__init__(example, max_turns=caps["max_turns"])


class NoTurnLimit(MultiHopEnv):
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.max_turns = None


class InfiniteTurns(MultiHopEnv):  # no limit of its own: the config's holds
    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        self.max_turns = math.inf


class IntegerFlag(MultiHopEnv):  # (text, 1) for a call that ran, (text, 0) for one that failed
    def run_call(self, name, arguments):
        text, ok = super().run_call(name, arguments)
        return text, int(ok)


class RaisingReward(MultiHopEnv):
    def reward(self, final_text):
        return 1 / 0


class RaisingClose(MultiHopEnv):
    def close(self):
        raise OSError("the service is gone")


class NumpyReward(MultiHopEnv):
    def reward(self, final_text):
        import numpy

        return numpy.bool_(True)


class ListReward(MultiHopEnv):
    def reward(self, final_text):
        return [1.0]


class FailsInStep3(MultiHopEnv):
    made = 0  # 2 held-out episodes before training, then 4 a step

    def __init__(self, example, **caps):
        super().__init__(example, **caps)
        FailsInStep3.made += 1
        if FailsInStep3.made > 10:
            raise ConnectionError("the backend went away")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The name of a fresh module holding ``MODULE``, importable from this process and its children."""
    name = f"user_envs_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _rows(env_name, n, log, seed=0):
    """``n`` built-in tasks in environment ``env_name``; an environment of the user's own logs to ``log`` (the
    multihop environment reads no such key)."""
    rows = []
    for i in range(n):
        row = make_task(seed + i, hops=1, ops=False)
        row["env"] = {**row["env"], "name": env_name, **({} if env_name == "multihop" else {"log": str(log)})}
        rows.append(row)
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_environment_of_your_own_trains_from_a_data_file_through_the_command(tmp_path, user_module):
    log = tmp_path / "env_log.jsonl"
    data = _write(tmp_path / "tasks.jsonl", _rows(f"{user_module}:Scaled", 40, log))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(HERE.parent)])}
    run = subprocess.run([sys.executable, "-m", "pact_fast", "train", "--data", str(data), "--out",
                          str(tmp_path / "run"), f"data.env_modules=[{user_module}]", "train.steps=2", "train.prompts_per_step=2", "rollout.group_size=2",
                          "data.eval_tasks=2", "rollout.max_new_tokens=24"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rewards = [json.loads(line)["reward"] for line in log.read_text().splitlines() if "reward" in line]
    assert rewards and set(rewards) <= {0.25, 0.75}  # the user's reward, never MultiHopEnv's 0 / 1
    summary = json.loads(run.stdout)
    assert summary["steps"] == 2 and summary["eval_before"]["mean_reward"] in (0.0, 0.25, 0.5, 0.75)


def test_the_environments_episodes_carry_its_calls_and_rewards(tmp_path, user_module):
    """The engine drives the user's class: the calls it ran are the episodes' calls, its rewards the episodes'."""
    log = tmp_path / "env_log.jsonl"
    (ex,) = [parse_example(r) for r in _rows(f"{user_module}:Scaled", 1, log)]
    call = ex.trace[0]["tool_calls"][0]["function"]
    engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer], group_size=2)
    episodes = engine.rollout([ex], make_env_factory(_data_cfg(user_module), engine.config))[0]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [ln for ln in lines if "call" in ln] == [{"call": call["name"], "ok": True}] * 2
    assert [ep.reward for ep in episodes] == [ln["reward"] for ln in lines if "reward" in ln] == [0.75, 0.75]
    assert [ep.tool_calls for ep in episodes] == [1, 1]


def test_an_environment_that_changes_its_example_changes_its_episode_only(tmp_path, user_module):
    """A class that popped the later user turns off its row's list took them from the group's other episodes and
    from every later step: those answered the first question and ended, rewarded, one user turn short. An object
    that is not data (a lock, a client) is shared, not copied."""
    (row,) = _rows(f"{user_module}:PopsUserTurns", 1, tmp_path / "log")
    row["env"]["later"] = ["what is the answer ?"]
    row["env"]["lock"] = threading.Lock()  # an object of a row built in Python (copy.deepcopy refuses a lock)
    ex = parse_example(row)
    make_env = make_env_factory(_data_cfg(user_module), RolloutConfig())
    for _ in range(2):  # two steps
        engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer, ex.answer], group_size=2)
        assert [ep.turns for ep in engine.rollout([ex], make_env)[0]] == [3, 3]
    assert ex.env["later"] == ["what is the answer ?"]


def test_a_user_turn_the_tokenizer_cannot_encode_goes_on_as_text(tmp_path, user_module):
    """A simulated user's turn with a lone surrogate (the model's own text, quoted) crashed the tokenizer with a
    TypeError; tool responses were already made encodable."""
    (ex,) = [parse_example(r) for r in _rows(f"{user_module}:EchoingUser", 1, tmp_path / "log")]
    engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer, ex.answer], group_size=1)
    (ep,) = engine.rollout([ex], make_env_factory(_data_cfg(user_module), engine.config))[0]
    assert (ep.finish, ep.turns, ep.reward) == ("answer", 3, 1.0)


@pytest.mark.parametrize("attr, message", [
    ("Missing", "has no 'Missing'"),
    ("NotAnEnv", "NotAnEnv is not a subclass of pact_fast.envs.base.ToolEnv"),
    ("NoReward", "NoReward does not implement reward"),
    ("FixedInit", r"FixedInit\(example, max_turns=..., .*\) does not fit its __init__\(example\)"),
    ("InstanceCheck", r"InstanceCheck.check_example must be a staticmethod"),
])
def test_a_class_that_cannot_serve_is_refused_when_the_data_loads_even_when_skipping_rows(tmp_path, user_module,
                                                                                          attr, message):
    """Such a refusal is the same for every row: with data.on_error=skip it skipped each of them and the run
    trained on the other rows (or none) with one summary line."""
    from pact_fast.data import DataSetupError, check_trainable

    rows = [make_task(100, hops=1, ops=False)] + _rows(f"{user_module}:{attr}", 2, tmp_path / "log")
    data = _write(tmp_path / "tasks.jsonl", rows)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataSetupError, match=f"tasks.jsonl:2: env name '{user_module}:{attr}': .*{message}"):
            load_examples(data, on_error=on_error, check=partial(check_trainable, env_modules=(user_module,)))


@pytest.mark.parametrize("attr, message", [
    ("BadCheck", r"BadCheck.check_example returned False: expected None or a reason"),
    ("RaisingCheck", r"RaisingCheck.check_example raised KeyError: 'city'"),
    ("ExitingCheck", r"ExitingCheck.check_example raised SystemExit: usage: check ROW"),
])
def test_a_row_its_check_refuses_or_trips_on_is_named_or_skipped(tmp_path, user_module, attr, message):
    from pact_fast.data import check_trainable

    rows = [make_task(100, hops=1, ops=False)] + _rows(f"{user_module}:{attr}", 2, tmp_path / "log")
    data = _write(tmp_path / "tasks.jsonl", rows)
    check = partial(check_trainable, env_modules=(user_module,))
    with pytest.raises(DataFormatError, match=f"tasks.jsonl:2: {message}"):
        load_examples(data, check=check)
    examples, report = load_examples(data, on_error="skip", check=check)
    assert [ex.line for ex in examples] == [1] and [line for line, _ in report.skipped] == [2, 3]


def test_a_module_that_does_not_import_or_a_row_the_class_refuses_is_named_with_file_and_line(tmp_path, user_module):
    from pact_fast.data import check_trainable

    rows = _rows(f"{user_module}:Scaled", 3, tmp_path / "log")
    del rows[1]["env"]["log"]
    with pytest.raises(DataFormatError, match="tasks.jsonl:2: env needs a 'log' file"):
        load_examples(_write(tmp_path / "tasks.jsonl", rows), check=partial(check_trainable, env_modules=(user_module,)))
    rows = _rows("no_such_module_of_yours:Env", 1, tmp_path / "log")
    with pytest.raises(DataFormatError, match=r"other.jsonl:1: env name 'no_such_module_of_yours:Env': cannot import "
                                              r"no_such_module_of_yours \(ModuleNotFoundError.*PYTHONPATH"):
        load_examples(_write(tmp_path / "other.jsonl", rows),
                      check=partial(check_trainable, env_modules=("no_such_module_of_yours",)))
    rows = _rows("weather", 1, tmp_path / "log")
    with pytest.raises(DataFormatError, match="unknown env name 'weather'; known: multihop, bfcl, or "
                                              "'package.module:Class'"):
        load_examples(_write(tmp_path / "third.jsonl", rows), check=check_trainable)


def test_a_module_that_exits_while_it_imports_is_refused_in_one_line(tmp_path, user_module):
    """A script's top-level argparse or sys.exit ended pact-fast with the script's status (0: a run that trained
    nothing and said nothing) or its usage line."""
    from pact_fast.data import DataSetupError, check_trainable

    for code, status in (("import sys\nsys.exit(0)\n", "0"),
                         ("import argparse\nargparse.ArgumentParser().parse_args(['--n'])\n", "2")):
        module = f"{user_module}_script{status}"
        (tmp_path / f"{module}.py").write_text(code)
        data = _write(tmp_path / "tasks.jsonl", _rows(f"{module}:Env", 1, tmp_path / "log"))
        with pytest.raises(DataSetupError, match=rf"^{data}:1: env name '{module}:Env': importing {module} exits "
                                                 rf"\(SystemExit: {status}\): its top-level code runs on import; "):
            load_examples(data, check=partial(check_trainable, env_modules=(module,)))


def test_a_data_file_alone_never_imports_code(tmp_path, user_module):
    """A downloaded data file naming a module (``antigravity:X`` opens a web browser when imported) is refused
    before the import unless the run's config allows that module."""
    from pact_fast.config import ConfigError, load_config
    from pact_fast.data import check_trainable

    marker = tmp_path / "imported"
    (tmp_path / f"{user_module}_side.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    rows = _rows(f"{user_module}_side:Env", 1, tmp_path / "log")
    for allowed in ((), ("other_envs",), (f"{user_module}_sid",)):
        with pytest.raises(DataFormatError, match=f"module {user_module}_side is not in data.env_modules .*: "
                                                  f"data.env_modules=\\[{user_module}_side\\] allows it"):
            load_examples(_write(tmp_path / "t.jsonl", rows), check=partial(check_trainable, env_modules=allowed))
    assert not marker.exists()
    with pytest.raises(DataFormatError, match="has no 'Env'"):  # allowed: imported
        load_examples(_write(tmp_path / "t.jsonl", rows),
                      check=partial(check_trainable, env_modules=(f"{user_module}_side",)))
    assert marker.exists()
    with pytest.raises(ConfigError, match=r"data.env_modules=\['my_envs'\] needs data.path"):
        load_config(None, ["data.env_modules=[my_envs]"])
    with pytest.raises(ConfigError, match="'my-envs' is not a module name"):
        load_config(None, ["data.path=x.jsonl", "data.env_modules=[my-envs]"])


@pytest.mark.parametrize("attr, message", [
    ("Raises", r"^Raises.run_call\('lookup'\) raised KeyError"),  # as run_call's, not step's
    ("Untupled", r"Untupled.run_call\('lookup'\) returned 'a bare text': expected \(response text, "),
    ("TextFlag", r"TextFlag.run_call\('lookup'\) returned \"\('error : the service is down', 'False'\)\": expected "
                 r"\(response text, ran without error: True or False\)"),
    ("StepRaises", r"StepRaises.step raised KeyError: 'session' \(example multihop-0-0\)"),
    ("StepDropsCalls", r"StepDropsCalls.step returned '\[\]' for 1 calls of example multihop-0-0: expected a response "
                       "text per call"),
    ("StepBytes", r"StepBytes.step returned \"\[b'delhi'\]\" for 1 calls"),
    ("NanReward", r"NanReward.reward returned 'nan' for example .*: a reward must be a finite number"),
    ("NoneReward", r"NoneReward.reward returned 'None'"),
    ("HugeReward", r"HugeReward.reward returned '1e\+300' .*: a reward must be a finite number \(within float32's "),
    ("ListReward", r"ListReward.reward returned '\[1.0\]'"),
    ("ListUser", r"ListUser.next_user_turn returned \"\['not', 'text'\]\""),
    ("ExitingCall", r"^ExitingCall.run_call\('lookup'\) raised SystemExit: 0 \(an environment answers"),
    ("BlankUser", r"BlankUser.next_user_turn returned '' for example multihop-0-0: expected the user's text \(not "
                  r"blank\), or None to end the episode"),
    ("RaisingInit", r"RaisingInit\(example multihop-0-0\) raised KeyError: 'city' \(a check of the row belongs in "
                    "its check_example"),
    ("DropsCaps", r"DropsCaps.__init__ did not hand max_call_chars=5000 to ToolEnv.__init__"),
    ("NoTurnLimit", r"NoTurnLimit\(example multihop-0-0\) has max_turns=None: expected a whole number >= 1"),
    ("RaisingReward", r"RaisingReward.reward raised ZeroDivisionError: division by zero \(example multihop-0-0\)"),
    ("RaisingClose", r"RaisingClose.close raised OSError: the service is gone"),
])
def test_an_environment_that_breaks_its_contract_stops_the_rollout_in_one_line(tmp_path, user_module, attr, message):
    """An exception in run_call or an override of step, a response that is not text or missing (the episode went on
    without it), a flag that is not a bool ("False" counted the failed
    call as a success), a reward that is not a finite number (NaN turned its group's advantages into NaN; None
    crashed far from the cause) name the class."""
    (ex,) = [parse_example(r) for r in _rows(f"{user_module}:{attr}", 1, tmp_path / "log")]
    engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer], group_size=1, max_call_chars=5000)
    with pytest.raises(ToolEnvError, match=message):
        engine.rollout([ex], make_env_factory(_data_cfg(user_module), engine.config))


@pytest.mark.parametrize("attr", ["InfiniteTurns", "IntegerFlag"])
def test_an_unlimited_turn_count_and_a_0_or_1_flag_are_the_contract_too(tmp_path, user_module, attr):
    """max_turns = math.inf (no limit of the environment's own) and a flag of 1 / 0 were refused as breaking the
    contract; the episode runs as with an int limit and a bool flag."""
    (ex,) = [parse_example(r) for r in _rows(f"{user_module}:{attr}", 1, tmp_path / "log")]
    engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer], group_size=1)
    (ep,) = engine.rollout([ex], make_env_factory(_data_cfg(user_module), engine.config))[0]
    assert ep.reward == 1.0 and ep.turns == 2


def test_a_numpy_reward_counts_as_its_number(tmp_path, user_module):
    (ex,) = [parse_example(r) for r in _rows(f"{user_module}:NumpyReward", 1, tmp_path / "log")]
    engine = _ScriptedEngine(build_tokenizer(), [_call_text(ex), ex.answer], group_size=1)
    (ep,) = engine.rollout([ex], make_env_factory(_data_cfg(user_module), engine.config))[0]
    assert ep.reward == 1.0 and type(ep.reward) is float


def test_the_turns_a_task_needs_count_its_later_user_turns(tmp_path, user_module):
    """The start-up warning that rollout.max_turns is too small counted one user turn for any environment but
    BFCL's: a multi-turn environment of the user's own was never warned about."""
    from pact_fast.envs import min_turns

    (row,) = _rows(f"{user_module}:Scaled", 1, tmp_path / "log")
    one = min_turns(parse_example(row))
    row["trace"] = row["trace"] + [{"role": "user", "content": "and the next one ?"},
                                   {"role": "assistant", "content": row["answer"]}]
    assert min_turns(parse_example(row)) == one + 1


def test_format_reward_without_multihop_rows_is_refused(tmp_path, user_module):
    from pact_fast.config import load_config
    from pact_fast.data import load_data

    data = _write(tmp_path / "tasks.jsonl", _rows(f"{user_module}:Scaled", 10, tmp_path / "log"))
    cfg = load_config(None, [f"data.path={data}", f"data.env_modules=[{user_module}]", "data.format_reward=0.1"])
    with pytest.raises(DataFormatError, match="data.format_reward=0.1 pays the multihop environment's episodes only"):
        load_data(cfg.data)
    cfg.data.format_reward = 0.0
    assert len(load_data(cfg.data)[0]) == 8


def test_env_modules_beside_data_whose_rows_name_no_environment_of_your_own_is_refused(tmp_path, user_module):
    """data.env_modules allows modules for rows that name ``module:Class``; beside rows that all name a built-in
    environment it is unread (the run trains in the built-in one), so it is refused as other unread options are."""
    from pact_fast.config import load_config
    from pact_fast.data import load_data

    data = _write(tmp_path / "tasks.jsonl", _rows("multihop", 10, tmp_path / "log"))
    cfg = load_config(None, [f"data.path={data}", f"data.env_modules=[{user_module}]"])
    with pytest.raises(DataFormatError, match=f"data.env_modules=\\[{user_module}\\]: no row of this data names"):
        load_data(cfg.data)
    cfg.data.env_modules = ()
    assert len(load_data(cfg.data)[0]) == 8
    mixed = _write(tmp_path / "mixed.jsonl", _rows("multihop", 9, tmp_path / "log") +
                   _rows(f"{user_module}:Scaled", 1, tmp_path / "log", seed=9))
    cfg = load_config(None, [f"data.path={mixed}", f"data.env_modules=[{user_module}]"])
    assert len(load_data(cfg.data)[0]) == 8  # one row of its own: the option is read


def _data_cfg(module):
    from pact_fast.config import DataConfig

    return DataConfig(path="tasks.jsonl", env_modules=(module,))


def _call_text(ex):
    """The trace's first call in the built-in (compact) format."""
    call = ex.trace[0]["tool_calls"][0]["function"]
    args = " , ".join(f"{k} = {v}" for k, v in call["arguments"].items())
    return f"<tool_call> {call['name']} ( {args} ) </tool_call>"


class _ScriptedEngine(HFRolloutEngine):
    """Turn k of every episode is ``turns[k]`` and the end-of-turn token (no model runs; the episodes of a
    rollout advance together)."""

    def __init__(self, tokenizer, turns, **cfg):
        stub = torch.nn.Linear(1, 1)
        stub.config = type("C", (), {"max_position_embeddings": 100_000})()
        super().__init__(stub, tokenizer, RolloutConfig(**cfg))
        self.turns, self.turn = turns, 0

    def _generate_turn(self, contexts, greedy, budgets):
        ids = self.tokenizer(self.turns[min(self.turn, len(self.turns) - 1)], add_special_tokens=False)["input_ids"]
        self.turn += 1
        return [ids + [self.eos] for _ in contexts], [[0.0] * (len(ids) + 1) for _ in contexts], [True] * len(contexts)


def test_an_environment_failing_mid_run_keeps_the_steps_before_it(tmp_path, user_module, capsys):
    """An environment that breaks in step 3 (a backend gone) stopped the run with its one line, and the two steps
    trained before it were lost with it (no checkpoint until train.save_every=50): they are checkpointed first."""
    import importlib

    from pact_fast.cli import main

    data = _write(tmp_path / "tasks.jsonl", _rows(f"{user_module}:FailsInStep3", 12, tmp_path / "log"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), f"data.env_modules=[{user_module}]",
                 "train.steps=4", "train.prompts_per_step=2", "rollout.group_size=2", "data.eval_tasks=2"]) == 2
    err = capsys.readouterr().err
    assert "FailsInStep3(example" in err and "ConnectionError: the backend went away" in err
    assert f"step 3 failed; saved the last whole step: {run / 'checkpoints' / 'step_000002'}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    importlib.import_module(user_module).FailsInStep3.made = -1000  # the backend is back
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
