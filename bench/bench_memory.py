"""Measured peak memory of one training step, to validate ``pact_fast.planner`` (issue 26 item 5).

One steady-state step as the trainer runs it, rollout-free: a synthetic prompt group (a shared prompt, a
trace block, G responses with tool-response spans, the expert trace as an SFT sequence) packed into one
micro-batch (``trainer.build_units``), scored with the fused head (``trainer.fused_micro_batch_loss``) or
with ``score_micro_batch`` + ``pact_loss``, backward, gradient clipping, AdamW step, ``zero_grad``.

Method (CPU): a first step, unmeasured, creates AdamW's state; the second runs under
``torch.profiler.profile(profile_memory=True)``, whose allocation events carry the CPU allocator's running
total of the bytes allocated while profiling. The peak of that total above its value before the step, plus
the bytes live before the step (parameters, buffers, optimizer state: summed over distinct storages), is the
measured peak. It counts tensors, not the resident set. Full fine-tuning and LoRA (the trainer's own set-up,
``model_setup.apply_lora`` with ``model.lora``'s defaults: r=16, alpha 32, every linear layer of the decoder
layers, base and lm_head frozen, so the fused head takes its frozen-head path: no dW) are measured on the same
workload, activation checkpointing enabled as the trainer does (non-reentrant), and compared with the planner's
prediction for the same model, dtype, options and packed-token count. LoRA also on a bf16 base
(``model.lora.base_dtype=bfloat16``: the model read in bf16, as the trainer reads it, float32 adapters; on the CPU
the base's forward runs in bf16 without autocast).

    python bench/bench_memory.py                      # SmolLM2-135M (fetch_model), bench/results/memory_cpu.json
    python bench/bench_memory.py --tokens 512 --json /tmp/m.json
"""
import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pact_fast import planner
from pact_fast.chat import LabeledSequence
from pact_fast.losses import OTHER, REASONING, TOOL_CALL, PACTLossConfig, anchor_rows, group_advantages, pact_loss
from pact_fast.model_setup import enable_checkpointing
from pact_fast.rollout import Episode
from pact_fast.scoring import PackedScorer
from pact_fast.task_inputs import GroupInputs
from pact_fast.trainer import (batch_for_loss, build_units, fused_micro_batch_loss,
                               pack_micro_batch, score_micro_batch)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import allocator_peak as common_allocator_peak  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory_cpu.json"


def synthetic_group(vocab, tokens, group_size=4, seed=0):
    """A prompt group whose packed trie holds about ``tokens`` tokens: ``(episodes, GroupInputs)``.

    Split of the budget: shared prompt 30%, trace block 10% (in the trace-conditioned prompt only), a
    prompt-only header, the expert trace 10%, the rest into G responses (each scored under both prompts; a
    third of every response is a tool-response span, response_mask 0)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shared, trace_block, header = ids(int(0.3 * tokens)), ids(int(0.1 * tokens)), ids(4)
    tc_prompt, po_prompt = shared + trace_block, shared + header
    n_trace = int(0.1 * tokens)
    n_resp = max(3, (tokens - len(tc_prompt) - len(header) - n_trace) // (2 * group_size))
    episodes = []
    for i in range(group_size):
        mask = [1] * n_resp
        mask[n_resp // 3: 2 * n_resp // 3] = [0] * (2 * n_resp // 3 - n_resp // 3)
        episodes.append(Episode(po_prompt, ids(n_resp), mask, [-1.0] * n_resp, reward=float(i % 2), turns=1))
    comps = [0] * len(po_prompt) + [REASONING, TOOL_CALL, OTHER] * (n_trace // 3) + [OTHER] * (n_trace % 3)
    sft = LabeledSequence(po_prompt + ids(n_trace), comps, [0] * len(comps),
                          [0] * len(po_prompt) + [1] * n_trace)
    return episodes, GroupInputs(tc_prompt, po_prompt, [sft])


def packed_sizes(episodes, inputs):
    """``{"tokens", "scored_rows", "varlen_keys", "varlen_pairs"}`` of the group's packed micro-batch: its
    tokens, its rows through the lm_head and what the varlen attention's memory depends on
    (``planner.varlen_sizes``)."""
    units = build_units([episodes], [inputs])
    packed, rows, _, _ = pack_micro_batch(units, [inputs])
    return {"tokens": packed.num_tokens, "scored_rows": len(rows),
            **{"varlen_" + k: v for k, v in planner.varlen_sizes(packed.subtree_end)._asdict().items()}}


def train_step(model, optimizer, episodes, inputs, *, fused_head=True, attn_backend="auto", memory_lean=False):
    """One trainer step on the group, rollout-free: packed loss, backward, clip, AdamW, zero_grad;
    ``attn_backend`` as ``train.attn_backend``, ``memory_lean`` as ``train.fused_head_memory_lean``."""
    scorer = PackedScorer(model)
    device = next(model.parameters()).device
    units = build_units([episodes], [inputs])
    rewards = torch.tensor([ep.reward for ep in episodes])
    advantages = group_advantages(rewards, torch.zeros(len(episodes), dtype=torch.long))
    lc = PACTLossConfig()
    anchored = anchor_rows(torch.tensor([0]), 1, lc.anchor_q, lc.seed, 0)
    loss_args = dict(config=lc, progress=0.0, step=0, rl_scale=1.0, sft_scale=1.0)
    sft_flat = inputs.sft
    if fused_head:
        loss, _, _ = fused_micro_batch_loss(scorer, units, [inputs], episodes, sft_flat, advantages, anchored, None,
                                            device, dict(loss_args, memory_lean=memory_lean), backend=attn_backend,
                                            temperature=1.0)
    else:
        res, _ = score_micro_batch(scorer, units, [inputs], backend=attn_backend, logprob_backend="auto",
                                   temperature=1.0)
        batch = batch_for_loss(units, res, episodes, sft_flat, advantages, anchored, None, device)
        loss, _ = pact_loss(batch, **loss_args)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def live_bytes(model, optimizer):
    """Bytes of the distinct storages of the model's parameters, buffers and gradients and the optimizer's
    state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def allocator_peak(fn):
    """(peak bytes of the CPU allocator's running total above its value before ``fn()``, fn's result), from
    the profiler's allocation events (``common.allocator_peak``)."""
    peak, out = common_allocator_peak(fn)
    if peak is None:
        raise RuntimeError("the profiler recorded no allocation events")
    return peak, out


def lora_wrap(model, lora_cfg=None):
    """``model`` with LoRA adapters injected in place by the trainer's set-up (``model_setup.apply_lora``;
    ``lora_cfg`` a ``config.LoRAConfig``, default ``model.lora``'s defaults): base weights and lm_head frozen.
    Returns ``model``, which ``PackedScorer`` scores like any causal LM."""
    from pact_fast.config import LoRAConfig
    from pact_fast.model_setup import apply_lora

    apply_lora(model, lora_cfg or LoRAConfig(enabled=True))
    return model


def measure_step(model, episodes, inputs, *, fused_head=True, grad_checkpointing=False, attn_backend="auto",
                 memory_lean=False, lr=1e-5):
    """Measured peak bytes (and its parts) of a steady-state step of ``model`` (its trainable parameters)."""
    if grad_checkpointing:  # as the trainer enables it
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    step = lambda: train_step(model, optimizer, episodes, inputs, fused_head=fused_head,  # noqa: E731
                              attn_backend=attn_backend, memory_lean=memory_lean)
    step()  # creates AdamW's state
    before = live_bytes(model, optimizer)
    t0 = time.perf_counter()
    extra, loss = allocator_peak(step)
    return {"live_before_bytes": before, "step_extra_bytes": extra, "peak_bytes": before + extra,
            "step_seconds_profiled": time.perf_counter() - t0, "loss": loss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local HF directory (default: fetch_model('smollm2-135m'))")
    parser.add_argument("--tokens", type=int, default=1024, help="target packed tokens of the micro-batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.group_size < 1:
        parser.error(f"--tokens {args.tokens} and --group-size {args.group_size}: at least 1 each")
    if os.path.isdir(args.json):  # a missing folder is made at the end; a folder in the file's place fails there
        parser.error(f"--json {args.json}: is a directory; give a file name")
    from pact_fast.config import LoRAConfig
    from pact_fast.model_setup import lora_targets
    from pact_fast.models import fetch_model, load_pretrained

    path = args.model or fetch_model("smollm2-135m", log=None)
    try:
        shape = planner.shape_from_dir(path)
    except planner.PlanError as exc:
        parser.error(str(exc))
    rows = []
    for name, lora, ckpt, base_dtype in (("full", False, False, "float32"), ("lora", True, False, "float32"),
                                         ("lora+ckpt", True, True, "float32"),
                                         ("lora-bf16-base", True, False, "bfloat16"),
                                         ("lora-bf16-base+ckpt", True, True, "bfloat16")):
        torch.manual_seed(0)
        model, _ = load_pretrained(path, dtype=getattr(torch, base_dtype))
        targets = ()
        if lora:
            targets = tuple(lora_targets(model, LoRAConfig(enabled=True)))
            model = lora_wrap(model)
        episodes, inputs = synthetic_group(shape.vocab_size, args.tokens, args.group_size)
        sizes = packed_sizes(episodes, inputs)
        measured = measure_step(model, episodes, inputs, grad_checkpointing=ckpt)
        options = planner.PlanOptions(dtype="float32", device="cpu", lora=lora, grad_checkpointing=ckpt,
                                      attn_backend="varlen", lora_base_dtype=base_dtype,
                                      **({"lora_targets": targets} if lora else {}))
        predicted = planner.predict(shape, sizes["tokens"], options, scored_rows=sizes["scored_rows"],
                                    varlen=planner.VarlenSizes(sizes["varlen_keys"], sizes["varlen_pairs"]))
        row = {"name": name, "lora_targets": list(targets), "lora_base_dtype": base_dtype, **sizes, **measured,
               "predicted_peak_bytes": predicted.total,
               "predicted_moment": predicted.moment, "predicted_terms": predicted.terms,
               "ratio_predicted_over_measured": predicted.total / measured["peak_bytes"]}
        rows.append(row)
        print(f"{name}: {sizes['tokens']} packed tokens, measured {measured['peak_bytes'] / 2**20:.1f} MiB, predicted "
              f"{predicted.total / 2**20:.1f} MiB (ratio {row['ratio_predicted_over_measured']:.3f}), "
              f"{measured['step_seconds_profiled']:.1f} s", flush=True)
        del model
    payload = {"model": str(path), "shape": shape._asdict(),
               "dtype": "float32 (no autocast); the bf16-base rows' base in bf16",
               "attn_backend": "varlen (auto on CPU)", "fused_head": True,
               "lora": {**asdict(LoRAConfig(enabled=True)), "setup": "pact_fast.model_setup.apply_lora"},
               "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "method": "steady-state step (AdamW state created by an unmeasured first step); peak = bytes live "
                         "before the step + the profiler allocator total's peak above its value before",
               "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
