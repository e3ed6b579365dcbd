"""The main job on quiet and on shared cores, with and without the command's thread settings.

    python bench/shared_cores.py --steps 10 --json bench/results/shared_cores_cpu.json

Each case runs ``pact-fast train train.steps=N`` in a fresh process (its own run directory) and records the
wall-clock time of the whole command and of its training steps (the sum of ``step_seconds`` in metrics.jsonl).
"Shared" starts ``--hogs`` busy processes beside it (pure-Python loops, as other jobs' work would be) and ends
them after. The settings compared:

- ``passive``: ``pact-fast`` as shipped: OMP_WAIT_POLICY=PASSIVE set before torch loads, torch's default threads;
- ``spin``: OpenMP's default waiting (idle workers spin): ``pact_fast.cli.main`` called without the command's
  module, so nothing sets OMP_WAIT_POLICY;
- ``threads1``: ``spin`` with ``train.threads=1``.

The ratio that matters is shared/quiet of one setting; the command's target is at most 2x.
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, write_json

SETTINGS = {
    "passive": ([sys.executable, "-m", "pact_fast"], []),
    "spin": ([sys.executable, "-c", "import sys; from pact_fast.cli import main; sys.exit(main())"], []),
    "threads1": ([sys.executable, "-c", "import sys; from pact_fast.cli import main; sys.exit(main())"],
                 ["train.threads=1"]),
}


def _hog():
    while True:
        pass


def run_case(setting, steps, out_dir):
    """Seconds of the whole command and of its training steps for one setting."""
    command, extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    args = ["train", f"train.steps={steps}", "train.progress=false", f"train.out_dir={out_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if '"step_seconds"' in line]
    return {"wall_s": round(wall, 2), "step_s": round(sum(r["step_seconds"] for r in rows), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=3, help="busy processes beside the job on shared cores")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--loads", nargs="+", default=["quiet", "shared"], choices=["quiet", "shared"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.loads:
            hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs if load == "shared"
                                                                                      else 0)]
            for h in hogs:
                h.start()
            try:
                for setting in args.settings:
                    row = {"load": load, "setting": setting, **run_case(setting, args.steps,
                                                                         Path(tmp) / f"{load}-{setting}")}
                    results.append(row)
                    print(row, flush=True)
            finally:
                for h in hogs:
                    h.terminate()
    quiet = {r["setting"]: r for r in results if r["load"] == "quiet"}
    for r in results:
        if r["load"] == "shared" and r["setting"] in quiet:
            r["step_s_vs_quiet"] = round(r["step_s"] / quiet[r["setting"]]["step_s"], 2)
            r["wall_s_vs_quiet"] = round(r["wall_s"] / quiet[r["setting"]]["wall_s"], 2)
    print_table(results, ["load", "setting", "wall_s", "step_s", "step_s_vs_quiet", "wall_s_vs_quiet"])
    if args.json:
        write_json(args.json, {"machine": machine_info("cpu"), "steps": args.steps, "hogs": args.hogs,
                               "results": results})


if __name__ == "__main__":
    main()
