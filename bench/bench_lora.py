"""Full fine-tuning vs LoRA vs LoRA + activation checkpointing on a real model, same steps, same data:
peak memory, step time, the losses, and held-out success after the same budget.

Each variant is one ``pact-fast train`` process (a process's high-water resident memory is the peak the
trainer logs on CPU as ``peak_memory_mb``), run one after another with identical settings but the variant's
keys; the JSON keeps every step's numbers and the machine.

    python bench/bench_lora.py --model ~/.cache/pact_fast/models/smollm2-135m --steps 12 \\
        --out bench/results/lora_cpu.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "full": [],
    "lora_r16": ["model.lora.enabled=true", "model.lora.r=16"],
    "lora_r16_ckpt": ["model.lora.enabled=true", "model.lora.r=16", "train.grad_checkpointing=true"],
}


def run_variant(name, model, steps, common, lora_lr, work):
    """One training run; returns its per-step metrics, summary and wall time."""
    out = Path(work) / name
    keys = VARIANTS[name] + ([f"train.lr={lora_lr}"] if name.startswith("lora") else [])
    cmd = [sys.executable, "-m", "pact_fast", "train", "--model", str(model), "--out", str(out),
           f"train.steps={steps}", *common, *keys]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"reward_mean"' in line]
    summary = json.loads((out / "summary.json").read_text())
    return {"keys": keys, "wall_seconds": time.time() - t0,
            "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
            "median_step_seconds": statistics.median(r["step_seconds"] for r in rows[1:] or rows),
            "median_update_seconds": statistics.median(r["step_seconds"] - r["rollout_seconds"]
                                                       for r in rows[1:] or rows),
            "steps": [{k: r.get(k) for k in ("step", "step_seconds", "rollout_seconds", "peak_memory_mb",
                                              "loss/total", "loss/sft", "reward_mean")} for r in rows],
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local HF model directory, e.g. pact-fast fetch-model's")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lora-lr", type=float, default=3e-4, help="LoRA's peak lr (full fine-tuning keeps the "
                        "pretrained default, 3e-5)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="bench/results/lora_cpu.json")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = parser.parse_args(argv)
    from common import json_target_error

    if json_target_error(args.out, "--out"):  # checked before the training runs, not after them
        parser.error(json_target_error(args.out, "--out"))
    common = ["train.prompts_per_step=4", "rollout.group_size=2", "data.hops=[1]", "train.progress=false",
              "train.tensorboard=false", "train.save_every=0", "train.eval_every=0", *args.overrides]
    import torch

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "model": str(args.model), "common": common, "variants": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants:
            result["variants"][name] = run_variant(name, args.model, args.steps, common, args.lora_lr, work)
            v = result["variants"][name]
            print(f"{name}: peak {v['peak_memory_mb']:.0f} MB, step {v['median_step_seconds']:.1f} s "
                  f"(update {v['median_update_seconds']:.1f} s), held-out {v['eval_after']}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
