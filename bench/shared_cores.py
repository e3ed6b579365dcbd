"""The main job on quiet and on shared cores, with and without the command's thread settings.

    python bench/shared_cores.py --steps 10 --json bench/results/shared_cores_cpu.json

Each case runs ``pact-fast train train.steps=N`` in a fresh process (its own run directory) and records the
wall-clock time of the whole command and of its training steps (the sum of ``step_seconds`` in metrics.jsonl).
"Shared" starts ``--hogs`` busy processes beside it (``--hog-kind``: pure-Python loops, or small torch jobs
whose OpenMP threads spin as torch's do by default) and ends them after; "passing" ends them ``--passing-s``
seconds into the job (a build that finishes while the run goes on: the run starts on busy cores and ends on quiet
ones). ``--hog-session``: the busy processes in one session of their own (``setsid``: another terminal's jobs, a
service; where the kernel groups the scheduler by session, ``/proc/sys/kernel/sched_autogroup_enabled`` = 1, that
session and the job's share the cores half and half, whatever their thread counts) or in the job's own session
(jobs started from the job's terminal: every busy thread of either takes an equal share). The settings compared:

- ``shipped``: ``python -m pact_fast``, i.e. the command with whatever its module sets before torch loads;
- ``spin``: OpenMP's default waiting (idle workers spin up to GOMP_SPINCOUNT=300k, then sleep):
  ``pact_fast.cli.main`` called without the command's module, nothing set;
- ``passive``: ``spin`` with OMP_WAIT_POLICY=PASSIVE (idle workers sleep at once);
- ``threads1``: ``spin`` with ``train.threads=1``;
- ``spincountN``: ``spin`` with GOMP_SPINCOUNT=N (idle workers spin N iterations, then sleep);
- ``shipped-threadsN``: ``shipped`` with ``train.threads=N`` (N above the core count: more than a fair share).

The ratio that matters is shared/quiet of one setting; the command's target is at most 2x.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import json_target_error, machine_info, print_table, write_json

_COMMAND = [sys.executable, "-m", "pact_fast"]
_CLI_ONLY = [sys.executable, "-c", "import sys; from pact_fast.cli import main; sys.exit(main())"]
# setting -> (command, extra overrides, environment)
SETTINGS = {
    "shipped": (_COMMAND, [], {}),
    "spin": (_CLI_ONLY, [], {}),
    "passive": (_CLI_ONLY, [], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "threads1": (_CLI_ONLY, ["train.threads=1"], {}),
    **{f"spincount{n}": (_CLI_ONLY, [], {"GOMP_SPINCOUNT": str(n)}) for n in (100, 1000, 10000, 100000)},
    **{f"shipped-threads{n}": (_COMMAND, [f"train.threads={n}"], {}) for n in (1, 2, 3, 4, 6, 8)},
}


# Busy processes beside the job: pure-Python loops, or torch jobs with OpenMP's default (spinning) waiting and
# torch's default threads, as another training run or a test suite would be.
HOGS = {
    "python": "while True: pass",
    "torch": "import torch\na = torch.randn(192, 192)\nwhile True:\n    (a @ a).relu_().sum()",
}


def start_hogs(kind, n, session="own"):
    """``n`` busy processes running ``HOGS[kind]``: in one new session of their own (``session`` "own"), or in this
    one ("same")."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    if not n:
        return []
    code = HOGS[kind]
    if session == "own":  # one leader process in a new session, its busy children beside it in that session
        code = (f"import subprocess, sys\nkids = [subprocess.Popen([sys.executable, '-c', {code!r}]) "
                f"for _ in range({n - 1})]\n{code}")
        leader = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
        leader.own_group = True  # its process group is its session: stop_hogs kills the group
        return [leader]
    return [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(n)]


def stop_hogs(hogs):
    """Kill the busy processes and, for a session of their own, every process of that session."""
    for h in hogs:
        try:
            os.killpg(h.pid, signal.SIGKILL) if getattr(h, "own_group", False) else h.kill()
        except ProcessLookupError:  # ended already
            pass
        h.wait()


def run_case(setting, steps, out_dir, hogs=(), hogs_for=None):
    """Seconds of the whole command and of its training steps for one setting, and how often it refitted its
    threads; ``hogs`` (busy processes) are killed ``hogs_for`` seconds into the command when given."""
    command, extra, env_extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    args = ["train", f"train.steps={steps}", "train.progress=false", f"train.out_dir={out_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(hogs_for, stop_hogs, (hogs,)) if hogs_for is not None else None
    if timer:
        timer.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if timer:
        timer.cancel()
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}: exit {proc.returncode}\n{err[-2000:]}")
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if '"step_seconds"' in line]
    return {"wall_s": round(wall, 2), "step_s": round(sum(r["step_seconds"] for r in rows), 2),
            "refits": (out + err).count("cores free of other processes")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=3, help="busy processes beside the job on shared cores")
    parser.add_argument("--hog-kind", default="python", choices=list(HOGS), help="what each busy process runs")
    parser.add_argument("--hog-session", default="own", choices=["own", "same"],
                        help="busy processes in a session of their own (another terminal's) or in the job's")
    parser.add_argument("--settings", nargs="+", default=["shipped", "spin", "passive", "threads1"],
                        choices=list(SETTINGS))
    parser.add_argument("--loads", nargs="+", default=["quiet", "shared"], choices=["quiet", "shared", "passing"])
    parser.add_argument("--passing-s", type=float, default=20.0,
                        help="seconds into each command that the busy processes of the passing load end")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.steps < 1 or args.hogs < 0 or (args.hogs == 0 and {"shared", "passing"} & set(args.loads)):
        parser.error(f"--steps {args.steps} (at least 1), --hogs {args.hogs} (at least 1 for a busy load)")
    if args.json and json_target_error(args.json):
        parser.error(json_target_error(args.json))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.loads:
            hogs = start_hogs(args.hog_kind, args.hogs if load == "shared" else 0, args.hog_session)
            try:
                for i, setting in enumerate(args.settings):
                    passing = start_hogs(args.hog_kind, args.hogs if load == "passing" else 0, args.hog_session)
                    try:
                        case = run_case(setting, args.steps, Path(tmp) / f"{load}-{i}-{setting}", passing,
                                        args.passing_s if passing else None)
                    finally:
                        stop_hogs(passing)
                    row = {"load": load, "setting": setting, **case}
                    results.append(row)
                    print(row, flush=True)
            finally:
                stop_hogs(hogs)
    quiet = {r["setting"]: r for r in results if r["load"] == "quiet"}
    for r in results:
        if r["load"] != "quiet" and r["setting"] in quiet:
            r["step_s_vs_quiet"] = round(r["step_s"] / quiet[r["setting"]]["step_s"], 2)
            r["wall_s_vs_quiet"] = round(r["wall_s"] / quiet[r["setting"]]["wall_s"], 2)
        if r["load"] != "quiet" and "shipped" in quiet:  # against the command as a user runs it on a quiet machine
            r["step_s_vs_quiet_shipped"] = round(r["step_s"] / quiet["shipped"]["step_s"], 2)
    print_table(results, ["load", "setting", "wall_s", "step_s", "refits", "step_s_vs_quiet", "wall_s_vs_quiet",
                          "step_s_vs_quiet_shipped"])
    if args.json:
        write_json(args.json, {"machine": machine_info("cpu"), "steps": args.steps, "hogs": args.hogs,
                               "hog_kind": args.hog_kind, "hog_session": args.hog_session,
                               "passing_s": args.passing_s if "passing" in args.loads else None, "results": results})


if __name__ == "__main__":
    main()
