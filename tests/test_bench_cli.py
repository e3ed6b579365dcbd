"""The benchmarks' shared options (bench/common.py): bad input is one argparse line, not a traceback or an hours-long
run, and a chosen subset of providers still runs the baseline its ratios divide by."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import bench_args, select_providers  # noqa: E402

WORKLOADS = {"cpu": {}, "tiny": {}, "W-logprob": {}, "W-logprob-4096": {}}


def _args(argv, monkeypatch, cuda=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    return bench_args("test", WORKLOADS, "W-logprob", "cpu", 5, 3, argv)


@pytest.mark.parametrize("argv,message", [
    (["--reps", "0"], "--reps 0: at least 1 timed repetition"),
    (["--reps", "-2"], "--reps -2: at least 1 timed repetition"),
    (["--device", "cuda"], "--device cuda: this torch"),
    (["--device", "gpu0"], "--device gpu0:"),
    (["--workload", "W-logprob"], "--workload W-logprob is a GPU workload"),
    (["--workload", "W-logprob-4096"], "on CPU use cpu or tiny"),
    (["--json", "/nonexistent-pact-dir/out.json"], "--json /nonexistent-pact-dir/out.json: no directory"),
    (["--json", "/tmp"], "--json /tmp: is a directory"),
])
def test_bad_options_are_one_argparse_line(argv, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(argv, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_defaults_follow_the_device(monkeypatch):
    _, device, workload, reps = _args([], monkeypatch)
    assert (device.type, workload, reps) == ("cpu", "cpu", 3)
    _, _, workload, reps = _args(["--workload", "tiny", "--reps", "7"], monkeypatch)
    assert (workload, reps) == ("tiny", 7)


def test_providers_subset_keeps_the_baseline_and_unknown_names_exit():
    available = {"naive": None, "torch_chunked": None, "triton": None}
    assert select_providers(None, available, "naive", "cpu") == ["naive", "torch_chunked", "triton"]
    assert select_providers(["triton"], available, "naive", "cpu") == ["naive", "triton"]
    assert select_providers(["fused_triton"], available, "naive", "cpu", skipped={"fused_triton": "CUDA"}) == \
        ["naive"]
    with pytest.raises(SystemExit, match="--providers: liger not among this benchmark's providers on cpu: naive"):
        select_providers(["triton", "liger"], available, "naive", "cpu")


def test_a_benchmark_script_refuses_an_unknown_provider_without_a_traceback():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_linear_logprobs.py"), "--workload", "tiny",
                           "--device", "cpu", "--providers", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "--providers: nope not among" in proc.stderr and "Traceback" not in proc.stderr


def test_the_rollout_benchmark_times_one_turn_of_the_hf_engine():
    """bench/bench_rollout.py calls the engines' turn as the rollout loop does (a budget per context): the call it
    times samples between one and max_new_tokens tokens per context."""
    from bench_rollout import timed
    from models import tiny_causal_lm
    from pact_fast.chat import prompt_ids
    from pact_fast.data import parse_example
    from pact_fast.envs import build_tokenizer, make_task
    from pact_fast.rollout import HFRolloutEngine, RolloutConfig

    tok = build_tokenizer()
    ctx = [list(prompt_ids(tok, parse_example(make_task(i, hops=1)))) for i in range(3)]
    engine = HFRolloutEngine(tiny_causal_lm("qwen3", vocab_size=len(tok)), tok, RolloutConfig(max_new_tokens=5))
    seconds, tokens = timed(engine, ctx, 1)
    assert seconds > 0 and len(ctx) <= tokens <= 5 * len(ctx)


def test_the_sass_report_refuses_the_options_it_does_not_read():
    """--sass returned before the options were parsed: --json, --workload, --reps and unknown flags went unread."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_linear_logprobs.py"), "--sass", "--json", "x.json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--sass prints the epilogue's SASS report and takes no other option (got --json " \
        "x.json)" in proc.stderr and "Traceback" not in proc.stderr


def test_the_fused_head_benchmark_counts_each_calls_own_gradients_in_its_peak():
    """The profiled call started by freeing the previous call's dX and dW, so its peak was taken over a baseline
    that still counted them: 128 MiB of 285 for the unfused head at the cpu workload, or not, run to run. Each call
    now starts with none alive: its peak holds its own dX and dW, the same on every run."""
    import bench_fused_pact_head as bench

    w = bench.WORKLOADS["tiny"]
    rows = w["B"] * w["T"] * 2 + w["S"] * w["E"]
    grads = (rows + w["V"]) * w["H"] * 4  # fp32 dX [N, H] and dW [V, H]
    peaks = [{r["provider"]: r["peak_MiB"] * 2 ** 20 for r in bench.run("tiny", "cpu", 1, ["unfused", "fused"])}
             for _ in range(2)]
    assert peaks[0] == peaks[1]
    assert peaks[0]["unfused"] >= grads and peaks[0]["fused"] >= grads, (peaks[0], grads)


def test_the_gpu_suites_report_needs_its_directory_and_a_section_refuses_the_reports_options(capsys):
    """`gpu_bench.py report` without --dir ended in a TypeError traceback; a section took --dir and --sections and
    read neither."""
    import gpu_bench

    for argv, message in ((["report"], "report needs --dir"),
                          (["head", "--dry-run", "--dir", "x"], "--dir: options of the report")):
        with pytest.raises(SystemExit) as exc:
            gpu_bench.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script,path,message", [
    ("step_model.py", "/nonexistent-pact-dir/out.json", "no directory"),
    ("roofline.py", "/nonexistent-pact-dir/out.json", "no directory"),
    ("bench_memory.py", "/tmp", "is a directory"),  # it makes a missing folder itself
    ("bench_rollout.py", "/nonexistent-pact-dir/out.json", "no directory"),
    ("shared_cores.py", "/nonexistent-pact-dir/out.json", "no directory"),
    ("sass.py", "/tmp", "is a directory"),
])
def test_scripts_refuse_an_unwritable_json_before_running(script, path, message):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--json", path], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert f"--json {path}: {message}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["gpu_bench.py", "logprob", "--dry-run"], ["gpu_check.py", "--dry-run"]],
                         ids=["gpu_bench", "gpu_check"])
def test_the_gpu_scripts_refuse_an_unwritable_json_before_running(argv):
    proc = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:], "--json", "/nonexistent-pact-dir/x.json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--json /nonexistent-pact-dir/x.json: no directory" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_lora_refuses_an_unwritable_out_before_training():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_lora.py"), "--model", "unused", "--steps", "1",
                           "--out", "/nonexistent-pact-dir/out.json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--out /nonexistent-pact-dir/out.json: no directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,interpret,message", [
    (["--probe", "--json", "/tmp/x.json"], "1", "--probe writes roofline_torch_ops.json and takes no other option "
                                                "(got --json)"),  # the json went unwritten, silently
    (["--probe", "--readme"], "1", "takes no other option (got --readme)"),
    (["--probe"], "0", "--probe counts the ops under the Triton interpreter: set TRITON_INTERPRET=1"),  # a traceback
    (["--head-sweep", "--step"], "1", "--head-sweep prints the sweep instead of the tables"),
])
def test_roofline_refuses_options_it_would_not_read(argv, interpret, message):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    proc = subprocess.run([sys.executable, str(BENCH / "roofline.py"), *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def _running(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("session", ["own", "same"])
def test_shared_cores_busy_processes_all_end(session):
    """bench/shared_cores.py's busy processes (in a session of their own: a leader and its children) must all end
    when it stops them: one left spinning would slow the user's machine, and every later measurement on it."""
    import time

    import shared_cores

    hogs = shared_cores.start_hogs("python", 3, session)
    deadline = time.monotonic() + 20
    while True:  # a session of its own: the leader starts its children
        if session == "own":
            found = subprocess.run(["pgrep", "-s", str(hogs[0].pid)], capture_output=True, text=True).stdout
            pids = [int(p) for p in found.split()]
        else:
            pids = [h.pid for h in hogs]
        if len(pids) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(pids) == 3 and all(_running(p) for p in pids)
    shared_cores.stop_hogs(hogs)
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]
