"""The GPU suite's benchmark sections, each measured side by side in one process, with the performance
model's prediction (bench/roofline.py) beside every measured figure.

    python bench/gpu_bench.py logprob --json logprob.json   # linear_logprobs vs naive, Liger, CCE, bare GEMMs
    python bench/gpu_bench.py layer --json layer.json       # one W-group layer of tree attention vs baselines
    python bench/gpu_bench.py group --json group.json       # the whole W-group pass (bench/bench_group.py)
    python bench/gpu_bench.py head --json head.json         # the PACT loss head: fused vs unfused vs naive
    python bench/gpu_bench.py model --json model.json       # the model's rows alone
    python bench/gpu_bench.py train --json train.json       # 3 steps of the main job on the device
    python bench/gpu_bench.py report --dir DIR --json suite.json   # merge the sections, print the table
    ... --dry-run                                           # CPU, TRITON_INTERPRET=1, tiny shapes

Every measured row carries ``ms`` and ``peak_MiB`` (None with ``skipped`` or ``error`` saying why),
``predicted_ms`` and ``ideal_ms`` from the time model (bench/roofline.py: max(compute, memory, issue) plus
launch overhead per launch, at its efficiency classes) for the device it ran on, ``measured_vs_predicted``,
and ``prediction`` naming which model figure that is. Baselines with no model of their own get the ideal
(bare GEMMs / visible-pairs at the same classes) as their prediction: a lower bound, labelled so. The report
prints each measured time beside the predicted one with their ratio: the first GPU run calibrates the classes.
"""
import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import json_target_error, machine_info, measure  # noqa: E402

import roofline  # noqa: E402
import sass  # noqa: E402

from pact_fast.packing import pack_back_to_back, pack_tree  # noqa: E402

# The issue term of the time model from the stored SASS table (bench/results/roofline_sass.json): compiling
# every kernel here would cost the suite a minute; each section's JSON names the table.
SASS_TABLE = sass.stored()

LOGPROB_WORKLOADS = {"W-logprob-H2048": dict(N=32768, H=2048, V=151936),
                     "W-logprob-H4096": dict(N=32768, H=4096, V=151936)}
LOGPROB_DRY = {"tiny-logprob": dict(N=64, H=32, V=500)}


def model_device(device):
    """The model's device name (roofline.DEVICES) for a torch device: H200 if the GPU says so, else H100."""
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return "H200"
    return "H100"


def _timed(fn, device, reps):
    """(ms, peak MiB, error): OOM and other failures become an error string, not a lost section. One warm-up
    call on CUDA (Triton compiles there); none on the CPU, where the dry run only checks the plumbing."""
    try:
        seconds, peak = measure(fn, device, reps=reps, warmup=1 if device.type == "cuda" else 0)
        return seconds * 1e3, peak / 2 ** 20, None
    except Exception as e:  # noqa: BLE001 (a baseline's failure is a reported figure)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None, f"{type(e).__name__}: {str(e)[:200]}"


# ---------------------------------------------------------------------------------------------
# linear_logprobs
# ---------------------------------------------------------------------------------------------

def logprob_providers(device):
    """name -> (fn(hidden, weight, targets) -> loss-like tensor, or None, skip reason)."""
    from pact_fast.ops import linear_logprobs

    from bench_linear_logprobs import providers as cpu_providers

    out = {
        "triton": (lambda h, w, t: linear_logprobs(h, w, t, backend="triton"), None),
        "naive": (cpu_providers(torch.device("cpu"))["naive"], None),  # logits, fp32 log_softmax, gather
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger_flce"] = (lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none"), None)
    except ImportError as e:
        out["liger_flce"] = (None, f"not installed ({e})")
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = (lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none"), None)
    except ImportError as e:
        out["cce"] = (None, f"not installed ({e})")
    if device.type != "cuda":
        for name in ("liger_flce", "cce"):
            if out[name][1] is None:
                out[name] = (None, "needs CUDA")
    return out


def bare_gemms(hidden, weight, grad_logits, passes):
    """The ideal's GEMMs in the input dtype: logits [N, V]; with "bwd" also dX [N, H] and dW [V, H]."""
    z = hidden @ weight.t()
    if "bwd" in passes:
        grad_logits @ weight
        grad_logits.t() @ hidden
    return z


def run_logprob(dry_run, device, reps):
    from bench_linear_logprobs import make_inputs

    workloads = LOGPROB_DRY if dry_run else LOGPROB_WORKLOADS
    dev = model_device(device)
    rows = []
    for workload, shape in workloads.items():
        N, H, V = shape["N"], shape["H"], shape["V"]
        model = {r["op"]: r for r in roofline.logprob_rows(workload, N, V, H, devices=(dev,), table=SASS_TABLE)}
        ideal = {mode: model[f"linear_logprobs {mode}"]["ideal_time_ms"] for mode in ("fwd", "fwd+bwd")}
        hidden, weight, targets = make_inputs(N, H, V, torch.bfloat16, device)
        grad = torch.randn(N, device=device)
        providers = logprob_providers(device)
        for name, (fn, skip) in providers.items():
            for mode in ("fwd", "fwd+bwd"):
                row = {"section": "logprob", "workload": workload, "shape": shape, "dtype": "bf16",
                       "provider": name, "mode": mode, "model_device": dev, "ideal_ms": ideal[mode]}
                if name == "triton":
                    m = model[f"linear_logprobs {mode}"]
                    row.update(predicted_ms=m["predicted_time_ms"], work_predicted_ms=m["predicted_ms"],
                               prediction=f"roofline: linear_logprobs {mode} (time model)",
                               predicted_extra_MiB=m["extra_memory_bytes"] / 2 ** 20)
                else:
                    row.update(predicted_ms=ideal[mode],
                               prediction=f"roofline ideal: {1 if mode == 'fwd' else 3} bare GEMM(s), a lower bound")
                if skip:
                    rows.append({**row, "ms": None, "peak_MiB": None, "skipped": skip})
                    continue
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(hidden, weight, targets)
                else:
                    def call(fn=fn):
                        h = hidden.detach().requires_grad_()
                        w = weight.detach().requires_grad_()
                        (fn(h, w, targets).float() * grad).sum().backward()
                ms, peak, err = _timed(call, device, reps)
                rows.append({**row, "ms": ms, "peak_MiB": peak, **({"error": err} if err else {})})
        passes = {"fwd": ("fwd",), "fwd+bwd": ("fwd", "bwd")}
        grad_logits = torch.randn(N, V, device=device, dtype=torch.bfloat16)
        for mode in ("fwd", "fwd+bwd"):
            ms, peak, err = _timed(lambda m=mode: bare_gemms(hidden, weight, grad_logits, passes[m]), device, reps)
            rows.append({"section": "logprob", "workload": workload, "shape": shape, "dtype": "bf16",
                         "provider": "cublas_gemms", "mode": mode, "model_device": dev, "ms": ms, "peak_MiB": peak,
                         "ideal_ms": ideal[mode], "predicted_ms": ideal[mode],
                         "prediction": f"roofline ideal: {1 if mode == 'fwd' else 3} bare GEMM(s)",
                         **({"error": err} if err else {})})
        del hidden, weight, grad_logits
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for r in rows:
            if r["workload"] == workload:
                base = next(b for b in rows if b["workload"] == workload and b["provider"] == "naive"
                            and b["mode"] == r["mode"])
                r["time_vs_naive"] = r["ms"] / base["ms"] if r["ms"] and base["ms"] else None
                r["measured_vs_predicted"] = r["ms"] / r["predicted_ms"] if r["ms"] and r["predicted_ms"] else None
    return rows


# ---------------------------------------------------------------------------------------------
# tree attention: one W-group layer
# ---------------------------------------------------------------------------------------------

def _torch_varlen(seq_lens, scale):
    """fn(q, k, v) over a back-to-back layout with torch.nn.attention.varlen (causal per sequence), or a
    skip reason. q: [1, Hq, L, D]; k, v: [1, Hkv, L, D]."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def fn(q, k, v):
        cu = torch.tensor([0] + seq_lens, device=q.device).cumsum(0).to(torch.int32)
        qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))  # [L, H, D]
        if gqa:
            extra = {"enable_gqa": True}
        else:
            extra = {}
            kt, vt = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (kt, vt))
        kwargs = {"scale": scale} if "scale" in params else {}
        m = max(seq_lens)
        return varlen_attn(qt, kt, vt, cu, cu, m, m, **causal, **extra, **kwargs).transpose(0, 1)[None]

    return fn, None


def attention_ideal_ms(subtree_end, HQ, HKV, D, device_name, mode="fwd+bwd"):
    """Visible-pairs ideal (ms, bf16) of one attention layer over a layout ``subtree_end [B, L]`` (SPEC section
    7) by the time model, at its attention classes (``roofline.attention_ideal_launches``); mode "fwd" or
    "fwd+bwd"."""
    passes = ("fwd",) if mode == "fwd" else ("fwd", "bwd")
    return roofline.predict_time_ms(roofline.attention_ideal_launches(subtree_end.cpu(), HQ, HKV, D, passes),
                                    device_name)


def _compiled_flex(subtree_end, HQ, HKV, scale):
    """fn(q, k, v): torch.compile'd FlexAttention with the tree's block mask built once (eager FlexAttention
    materialises every score); a mask reused by every layer, as a trainer would."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, L = subtree_end.shape
    ends = subtree_end.long()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < ends[b, kv_idx])

    # _compile: build the block mask block by block instead of evaluating mask_mod on a dense [L, L] grid
    compiled = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
    block_mask = create_block_mask(mask_mod, B, None, L, L, device=subtree_end.device, **compiled)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=HQ != HKV)


def layer_shape(dry_run):
    from bench_group import WORKLOADS

    w = WORKLOADS["tiny" if dry_run else "W-group"]
    return "W-group-tiny" if dry_run else "W-group-layer", w


def run_layer(dry_run, device, reps):
    from bench_group import make_group

    from pact_fast.ops import tree_attention

    workload, w = layer_shape(dry_run)
    seqs, _ = make_group(w)
    HQ, HKV, D = w["heads"], w["kv_heads"], w["head_dim"]
    dtype = torch.float32 if dry_run else torch.bfloat16
    dev = model_device(device)
    models = {r["op"]: r for r in roofline._group_rows((dev,), SASS_TABLE)}
    model_ops = {"triton": "tree_attention fwd+bwd", "triton_atomic": "tree_attention fwd+bwd (dq atomics)"}
    try:
        import pact_fast.kernels.tree_attention_launch  # noqa: F401
        has_triton = None
    except ImportError as e:
        has_triton = f"no Triton tree-attention kernels: {e}"
    rows = []
    for layout, pack in (("packed", pack_tree), ("b2b", pack_back_to_back)):
        ends = pack(seqs).subtree_end[None].to(device)
        L = ends.shape[1]
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, h, L, D, generator=g).to(dtype).to(device) for h in (HQ, HKV, HKV, HQ))
        backends = {"triton": (None, has_triton if not (dry_run and layout == "b2b") else
                               "dry run: the interpreter runs the packed layout only")}
        if layout == "packed":  # the 5-matmul backward (dq by fp32 atomics) beside the default split
            backends["triton_atomic"] = (
                lambda q, k, v, ends=ends: tree_attention(q, k, v, ends, backend="triton", dq_mode="atomic",
                                                          validate=False), has_triton)
        backends["flex"] = (None, "FlexAttention backward needs CUDA")
        if device.type == "cuda":
            try:
                backends["flex"] = (_compiled_flex(ends, HQ, HKV, D ** -0.5), None)
            except Exception as e:  # noqa: BLE001 (e.g. an OOM building the block mask)
                backends["flex"] = (None, f"block mask failed: {type(e).__name__}: {str(e)[:200]}")
                torch.cuda.empty_cache()
        backends["varlen"] = (None, None)
        if dry_run:
            backends["sdpa"] = (None, None)
        if layout == "b2b":
            backends["torch_varlen"] = _torch_varlen([len(s) for s in seqs], D ** -0.5)
            if device.type != "cuda" and backends["torch_varlen"][1] is None:
                backends["torch_varlen"] = (None, "torch.nn.attention.varlen needs CUDA")
        for name, (custom, skip) in backends.items():
            row = {"section": "layer", "workload": workload, "layout": layout, "provider": f"{layout}-{name}",
                   "mode": "fwd+bwd", "dtype": str(dtype).replace("torch.", ""),
                   "shape": {"L": L, "HQ": HQ, "HKV": HKV, "D": D}, "model_device": dev}
            ideal = attention_ideal_ms(ends, HQ, HKV, D, dev)
            model = models.get(model_ops.get(name), {})
            if layout == "packed" and model and not dry_run:
                row.update(predicted_ms=model["predicted_time_ms"], ideal_ms=model["ideal_time_ms"],
                           work_predicted_ms=model["predicted_ms"],
                           prediction=f"roofline: {model['op']} (time model)")
            else:
                row.update(predicted_ms=ideal, ideal_ms=ideal, prediction="visible-pairs ideal of this layout, a lower bound")
            if skip:
                rows.append({**row, "ms": None, "peak_MiB": None, "skipped": skip})
                continue

            def call(name=name, custom=custom):
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = custom(qq, kk, vv) if custom else tree_attention(qq, kk, vv, ends, backend=name,
                                                                       validate=False)
                out.backward(do)

            ms, peak, err = _timed(call, device, reps)
            rows.append({**row, "ms": ms, "peak_MiB": peak, **({"error": err} if err else {})})
        del q, k, v, do
    base = next((r for r in rows if r["provider"] == "b2b-varlen" and r["ms"]), None)
    for r in rows:
        r["time_vs_b2b_varlen"] = r["ms"] / base["ms"] if base and r["ms"] else None
        r["measured_vs_predicted"] = r["ms"] / r["predicted_ms"] if r["ms"] and r.get("predicted_ms") else None
    return rows


# ---------------------------------------------------------------------------------------------
# the whole W-group pass
# ---------------------------------------------------------------------------------------------

EAGER_FLEX = "eager FlexAttention (pact_fast.ops backend='flex') materialises every score at this size; " \
             "see the layer section for compiled FlexAttention"


def group_rows(bench_group, workload, device, reps, names, skipped):
    """bench_group.run's measurements, with each provider's failure (an OOM, a missing backend) reported in
    its row instead of ending the section; providers in ``skipped`` {name: reason} get rows saying so.
    Returns (rows, token counts)."""
    w = bench_group.WORKLOADS[workload]
    model = bench_group.make_model(w, device)
    seqs, scored = bench_group.make_group(w)
    tokens = {"tokens_tree": pack_tree(seqs).num_tokens, "tokens_back_to_back": sum(map(len, seqs)),
              "scored_tokens": int(sum(map(len, scored)))}
    rows, reference, grads = [], None, None
    for name, fn in bench_group.providers(model, seqs, scored, device).items():
        if names and name not in names:
            continue
        if name in skipped:
            rows += [{"provider": name, "mode": m, "ms": None, "peak_MiB": None, "skipped": skipped[name]}
                     for m in ("fwd", "fwd+bwd")]
            continue
        try:
            with torch.no_grad():
                logp = fn().float()
        except Exception as e:  # noqa: BLE001
            rows += [{"provider": name, "mode": m, "ms": None, "peak_MiB": None,
                      "error": f"{type(e).__name__}: {str(e)[:200]}"} for m in ("fwd", "fwd+bwd")]
            continue
        reference = logp if reference is None else reference
        if grads is None:
            grads = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)).to(device)

        def fwd_bwd(fn=fn):
            model.zero_grad(set_to_none=True)
            (fn() * grads).sum().backward()

        def fwd(fn=fn):
            with torch.no_grad():
                fn()

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            ms, peak, err = _timed(call, device, reps)
            rows.append({"provider": name, "mode": mode, "ms": ms, "peak_MiB": peak,
                         "max_abs_diff_vs_first": (logp - reference).abs().max().item(),
                         **({"error": err} if err else {})})
        model.zero_grad(set_to_none=True)
    for row in rows:
        base = next((r for r in rows if r["provider"] == "b2b-varlen" and r["mode"] == row["mode"] and r["ms"]), None)
        row["time_vs_b2b_varlen"] = row["ms"] / base["ms"] if base and row["ms"] else None
    return rows, tokens


def run_group(dry_run, device, reps):
    """bench_group's providers on W-group (CUDA) or tiny (dry run). The model has no whole-pass figure: each row's
    prediction is the number of layers times the visible-pairs attention ideal of its layout (attention only,
    a lower bound)."""
    import bench_group

    workload = "tiny" if dry_run else "W-group"
    # dry run: the plumbing, not every provider. CUDA: not the flex providers, whose eager FlexAttention
    # (pact_fast.ops) materialises every score; the layer section measures compiled FlexAttention.
    skipped = {"packed-flex": EAGER_FLEX, "b2b-flex": EAGER_FLEX}
    names = ["packed-sdpa", "b2b-sdpa"] if dry_run else None
    rows, tokens = group_rows(bench_group, workload, device, reps, names, skipped)
    layers = bench_group.WORKLOADS[workload]["layers"]
    dev = model_device(device)
    w = bench_group.WORKLOADS[workload]
    seqs, _ = bench_group.make_group(w)
    layouts = {"packed": pack_tree(seqs).subtree_end[None], "b2b": pack_back_to_back(seqs).subtree_end[None]}
    for r in rows:
        layout = "packed" if r["provider"].startswith("packed") else "b2b"
        ideal = layers * attention_ideal_ms(layouts[layout], w["heads"], w["kv_heads"], w["head_dim"], dev, r["mode"])
        r.update(section="group", workload=workload, model_device=dev, tokens=tokens, predicted_ms=ideal,
                 ideal_ms=ideal, prediction=f"{layers} x visible-pairs attention ideal of the {layout} layout "
                                            "(attention only, a lower bound)")
        r["measured_vs_predicted"] = r["ms"] / r["predicted_ms"] if r["ms"] and r["predicted_ms"] else None
    return rows


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# the PACT loss head: fused vs unfused vs naive (bench/bench_fused_pact_head.py)
# ---------------------------------------------------------------------------------------------

def run_head(dry_run, device, reps):
    """bench_fused_pact_head's providers on W-logprob rows laid out as a PACT micro-batch (CUDA; its tiny
    workload in a dry run), fwd+bwd. fused_triton is predicted by the model's "fused_pact_head fwd+bwd" row
    (the default loss has no entropy bonus); the others get three bare GEMMs, a lower bound."""
    import bench_fused_pact_head as head

    workload = "tiny" if dry_run else "W-logprob"
    w = head.WORKLOADS[workload]
    N, H, V = 2 * w["B"] * w["T"] + w["S"] * w["E"], w["H"], w["V"]
    dev = model_device(device)
    models = {r["op"]: r for r in roofline.fused_head_rows(workload, N, V, H, devices=(dev,), table=SASS_TABLE)}
    modelled = {"fused_triton": "fused_pact_head fwd+bwd", "fused_triton_lean": "fused_pact_head fwd+bwd (memory_lean)"}
    ideal = models["fused_pact_head fwd+bwd"]["ideal_time_ms"]
    rows = []
    for r in head.run(workload, device, reps):
        row = {"section": "head", "workload": workload, "shape": {"N": N, "H": H, "V": V},
               "dtype": str(w["dtype"]).replace("torch.", ""), "model_device": dev, "ideal_ms": ideal,
               "ms": None, "peak_MiB": None, **r}
        if r["provider"] in modelled:
            model = models[modelled[r["provider"]]]
            row.update(predicted_ms=model["predicted_time_ms"], work_predicted_ms=model["predicted_ms"],
                       prediction=f"roofline: {model['op']} (time model)",
                       predicted_extra_MiB=model["extra_memory_bytes"] / 2 ** 20)
        else:
            row.update(predicted_ms=ideal, prediction="roofline ideal: 3 bare GEMMs, a lower bound")
        row["measured_vs_predicted"] = row["ms"] / row["predicted_ms"] if row["ms"] else None
        rows.append(row)
    return rows


def run_model(dry_run, device, reps):
    return roofline.model_rows(table=SASS_TABLE)


# ---------------------------------------------------------------------------------------------
# the main job on the device: every CUDA-only path of a training step at once
# ---------------------------------------------------------------------------------------------

TRAIN_STEPS = 3


def run_train(dry_run, device, reps):
    """TRAIN_STEPS steps of ``pact-fast train`` (the built-in environment and tiny model) on ``device``, no
    held-out evaluation: on CUDA the HF engine's rollouts with on-device sampling, the
    packed scoring through the Triton tree attention and the fused head, the update. One row per step: its
    seconds, rollout seconds, loss, peak memory and whether the loss and gradient norm are finite (a step that
    raises fails the section). No model prediction: the whole-step model (bench/step_model.py) is for the
    W-group workload, not this tiny one."""
    import math
    import tempfile

    from pact_fast.cli import main as cli

    with tempfile.TemporaryDirectory() as out:
        code = cli(["train", f"train.steps={TRAIN_STEPS}", "train.progress=false", f"train.out_dir={out}",
                    "train.eval_every=0", f"train.device={device.type}"])
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for m in (x for x in lines if "step_seconds" in x):
        finite = all(math.isfinite(m[k]) for k in ("loss/total", "grad_norm") if k in m)
        rows.append({"section": "train", "workload": "main job", "provider": f"pact-fast train ({device.type})",
                     "step": m["step"], "ms": 1e3 * m["step_seconds"], "rollout_ms": 1e3 * m["rollout_seconds"],
                     "loss": m.get("loss/total"), "peak_MiB": m.get("peak_memory_mb"), "finite": finite,
                     "predicted_ms": None, "measured_vs_predicted": None, "exit_code": code,
                     "status": "ok" if finite and code == 0 else "FAILED: non-finite loss or a non-zero exit"})
    if len(rows) != TRAIN_STEPS:
        raise RuntimeError(f"gpu_bench train: {len(rows)} steps logged of {TRAIN_STEPS} (exit code {code})")
    return rows


CUDA_REPS = {"logprob": 5, "layer": 10, "group": 2, "head": 3, "model": 1, "train": 1}  # within the suite's 8 min
SECTIONS = {"logprob": run_logprob, "layer": run_layer, "group": run_group, "head": run_head, "model": run_model,
            "train": run_train}
COLUMNS = ["section", "workload", "provider", "mode", "ms", "predicted_ms", "measured_vs_predicted", "ideal_ms",
           "peak_MiB", "status"]


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def report(directory, sections):
    """Merge the sections' JSON (missing or failed ones become {'error': ...}) into one document."""
    doc = {"sections": {}}
    for name in sections:
        path = Path(directory) / f"{name}.json"
        if path.exists():
            doc["sections"][name] = json.loads(path.read_text())
        else:
            log = Path(directory) / f"{name}.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            doc["sections"][name] = {"error": "section wrote no JSON (timeout or crash)", "log_tail": tail}
    return doc


def failures(doc):
    """Sections that wrote no JSON and correctness cases that failed, as short strings."""
    out = [f"section {n}: {sec['error']}" for n, sec in doc["sections"].items() if "error" in sec]
    check = doc["sections"].get("check", {}).get("results", {})
    for kernel, cases in check.items():
        if isinstance(cases, list):
            out += [f"check {kernel}/{c['case']}/{c.get('dtype')}" for c in cases if not c["passed"]]
    out += [f"train step {r['step']}: {r['status']}" for r in doc["sections"].get("train", {}).get("rows", [])
            if r["status"] != "ok"]
    return out


def print_table(doc):
    lines = []
    order = [n for n in doc["sections"] if n == "model"] + [n for n in doc["sections"] if n != "model"]
    for name, sec in ((n, doc["sections"][n]) for n in order):
        if "error" in sec:
            lines.append(f"[{name}] ERROR: {sec['error']}")
            continue
        if name == "check":
            for kernel, cases in sec["results"].items():
                if isinstance(cases, dict):
                    lines.append(f"[check] {kernel}: skipped: {cases['skipped']}")
                    continue
                ok = sum(c["passed"] for c in cases)
                worst = max((e for c in cases for e in c.get("errors", {}).values()), default=float("nan"))
                lines.append(f"[check] {kernel}: {ok}/{len(cases)} cases passed, worst relative error {worst:.3g}")
                lines += [f"[check]   FAILED {c['case']} {c.get('dtype')} {c.get('error', c.get('errors'))}"
                          for c in cases if not c["passed"]]
            continue
        if name == "model":
            lines += [f"[model] {r['workload']:18} {r['op']:44} {r['device']:5} predicted time "
                      f"{_fmt(r.get('predicted_time_ms'))} ms  ideal {_fmt(r.get('ideal_time_ms'))} ms  "
                      f"(work model {_fmt(r['predicted_ms'])} / {_fmt(r['ideal_ms'])} ms)" for r in sec["rows"]]
            continue
        rows = sec["rows"]
        for r in rows:
            r["status"] = r.get("skipped") or r.get("error") or "ok"
        widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in COLUMNS]
        lines.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        lines += ["  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(COLUMNS, widths)) for r in rows]
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=sorted(SECTIONS) + ["report"])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--json", help="write the section's JSON here")
    ap.add_argument("--dir", help="report: the directory holding the sections' JSON")
    ap.add_argument("--sections", nargs="*",
                    default=["check", "logprob", "layer", "group", "head", "model", "train"])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default CUDA_REPS, 1 on CPU)")
    args = ap.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps {args.reps}: at least 1 timed repetition")
    if args.json and json_target_error(args.json):
        ap.error(json_target_error(args.json))
    given = [flag for flag, on in (("--dir", args.dir is not None), ("--sections", "--sections" in (argv or sys.argv)))
             if on]
    if args.section == "report" and args.dir is None:
        ap.error("report needs --dir, the directory that holds the sections' JSON")
    if args.section != "report" and given:
        ap.error(f"{', '.join(given)}: options of the report; a section reads --dry-run, --json and --reps")
    if args.section == "report":
        doc = report(args.dir, args.sections)
        doc.update(dry_run=args.dry_run, machine=machine_info("cuda" if torch.cuda.is_available() else "cpu"))
        doc["failures"] = failures(doc)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print_table(doc)
        if doc["failures"]:
            print(f"gpu_suite: FAILURES: {doc['failures']}")
        return 1 if doc["failures"] else 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device; use --dry-run on the CPU")
    reps = args.reps or (1 if args.dry_run else CUDA_REPS[args.section])
    rows = SECTIONS[args.section](args.dry_run, device, reps)
    doc = {"section": args.section, "dry_run": args.dry_run, "machine": machine_info(device),
           "interpret": os.environ.get("TRITON_INTERPRET") == "1", "rows": rows,
           "issue_term": next(iter(SASS_TABLE.values()))["source"]}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
