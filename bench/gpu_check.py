"""Correctness of every Triton kernel on CUDA against float64 references (SPEC section 5).

    python bench/gpu_check.py --json check.json            # CUDA: GPU tile configurations, small and W shapes
    TRITON_INTERPRET=1 python bench/gpu_check.py --dry-run  # CPU interpreter, tiny shapes, same JSON structure

Each case runs the Triton path (forward and backward with random upstream gradients) in bf16 and fp16
and compares every output and gradient with a float64 reference computed in chunks of rows (so the
W-logprob and W-group shapes fit: no [N, V] or [L, L] float64 tensor is ever whole). Beside each error
is the error of plain PyTorch in the same dtype on the same inputs. A quantity passes when

    error < 1e-2   and   error <= max(2 * plain-PyTorch error, 2e-3)

(the second bound only where the plain-PyTorch error was measured; 2e-3 is a floor under which the
comparison says nothing). The large-logits case is judged by the second bound alone: there bf16 rounding of
|logits| ~ 100 already costs plain PyTorch ~2% on the gradients and ~10% on the (near-zero) entropy. Results are one dict per case: shape, dtype, errors, ``passed``.
"""
import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

TOL = 1e-2
FLOOR = 2e-3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(out, ref):
    """|out - ref| / |ref| in float64 (Frobenius norms), as tests/conftest.py."""
    ref = ref.double()
    return ((out.to(ref.device).double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _verdict(errors, plain, absolute=True):
    """passed flag for {name: error} given {name: plain-PyTorch error or None}; ``absolute=False`` drops the
    error < TOL bound (for inputs where the dtype itself cannot meet it)."""
    return all((e < TOL or not absolute) and (plain.get(k) is None or e <= max(2 * plain[k], FLOOR))
               for k, e in errors.items())


# ---------------------------------------------------------------------------------------------
# linear_logprobs
# ---------------------------------------------------------------------------------------------

def logprob_inputs(N, H, V, dtype, device, scale=1.0, ignored=0.1, seed=0):
    """hidden [N, H], weight [V, H], bias [V] in ``dtype``; targets [N] with a fraction ``ignored`` at -100;
    g_logp, g_ent [N] fp32 upstream gradients; drawn on ``device`` (the W shapes' weights are large)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, device=device) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g, device=device).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    targets[torch.randperm(N, generator=g, device=device)[:max(1, int(ignored * N))]] = -100
    g_logp, g_ent = torch.randn(N, generator=g, device=device), torch.randn(N, generator=g, device=device)
    return hidden, weight, bias, targets, g_logp, g_ent


def logprob_reference(hidden, weight, bias, targets, g_logp, g_ent, temperature, dtype, chunk):
    """Naive log-softmax path in ``dtype`` over chunks of ``chunk`` rows: logp, entropy [N] and the gradients of
    sum(logp * g_logp + ent * g_ent) into hidden [N, H], weight [V, H], bias [V] (weight/bias accumulated in
    float64 across chunks)."""
    from pact_fast.ops import linear_logprobs_reference

    w_all = weight.to(dtype)
    b_all = None if bias is None else bias.to(dtype)
    logp, ent, dx = [], [], []
    dw = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    db = None if bias is None else torch.zeros(bias.shape, dtype=torch.float64, device=weight.device)
    for s in range(0, hidden.shape[0], chunk):
        x = hidden[s:s + chunk].to(dtype).requires_grad_()
        w = w_all.detach().requires_grad_()
        b = None if b_all is None else b_all.detach().requires_grad_()
        lp, en = linear_logprobs_reference(x, w, targets[s:s + chunk], bias=b, temperature=temperature)
        (lp * g_logp[s:s + chunk].to(dtype) + en * g_ent[s:s + chunk].to(dtype)).sum().backward()
        logp.append(lp.detach())
        ent.append(en.detach())
        dx.append(x.grad)
        dw += w.grad.double()
        if b is not None:
            db += b.grad.double()
        del x, w, b, lp, en
    return torch.cat(logp), torch.cat(ent), torch.cat(dx), dw, db


def check_logprob_case(name, N, H, V, dtype_name, device, bias=False, temperature=1.0, scale=1.0, chunk=1024,
                       absolute=True):
    """One case: Triton linear_logprobs (GPU tile configuration, i.e. launch.plan's default) vs float64."""
    from pact_fast.ops import linear_logprobs

    dtype = DTYPES[dtype_name]
    hidden, weight, b, targets, g_logp, g_ent = logprob_inputs(N, H, V, dtype, device, scale=scale)
    b = b if bias else None
    leaves = [t.clone().requires_grad_() for t in [hidden, weight] + ([b] if bias else [])]
    t0 = time.perf_counter()
    logp, ent = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                                temperature=temperature, return_entropy=True, backend="triton")
    (logp * g_logp + ent * g_ent).sum().backward()
    kernel_s = time.perf_counter() - t0
    ours = {"logp": logp.detach(), "entropy": ent.detach(), "d_hidden": leaves[0].grad, "d_weight": leaves[1].grad}
    if bias:
        ours["d_bias"] = leaves[2].grad
    dtypes_ok = logp.dtype == torch.float32 and all(leaves[i].grad.dtype == dtype for i in range(len(leaves)))
    del leaves, logp, ent
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    plain_out = dict(zip(names, logprob_reference(hidden, weight, b, targets, g_logp, g_ent, temperature,
                                                  dtype, chunk)))
    ref = dict(zip(names, logprob_reference(hidden, weight, b, targets, g_logp, g_ent, temperature,
                                            torch.float64, chunk)))
    errors = {k: rel_err(v, ref[k]) for k, v in ours.items()}
    plain = {k: rel_err(plain_out[k], ref[k]) for k in ours}
    finite = all(torch.isfinite(v).all().item() for v in ours.values())
    return {"kernel": "linear_logprobs", "case": name, "shape": {"N": N, "H": H, "V": V}, "dtype": dtype_name,
            "bias": bias, "temperature": temperature, "scale": scale, "errors": errors, "plain_torch_errors": plain,
            "kernel_s": kernel_s, "criterion": "error < 1e-2 and <= 2x plain" if absolute else "<= 2x plain",
            "passed": bool(finite and dtypes_ok and (ours["logp"] <= 0).all().item()
                           and _verdict(errors, plain, absolute))}


def logprob_cases(dry_run):
    """(name, N, H, V, kwargs): the CPU tests' odd shapes, large logits, and the W-logprob shapes."""
    small = [("N37-H48-V203", 37, 48, 203), ("N16-H32-V64", 16, 32, 64), ("N5-H24-V1001", 5, 24, 1001)]
    cases = []
    for name, N, H, V in small:
        cases.append((name, N, H, V, {}))
        cases.append((name + "-bias-T0.7", N, H, V, {"bias": True, "temperature": 0.7}))
    cases.append(("large-logits", 33, 64, 517, {"scale": 30.0, "absolute": False}))
    if dry_run:
        cases.append(("W-logprob-tiny", 96, 32, 1000, {"chunk": 40}))
    else:
        cases += [("W-logprob-H2048-bias-T0.7", 32768, 2048, 151936, {"bias": True, "temperature": 0.7}),
                  ("W-logprob-H4096", 32768, 4096, 151936, {})]
    return cases


# ---------------------------------------------------------------------------------------------
# tree_attention
# ---------------------------------------------------------------------------------------------

def tree_reference(q, k, v, subtree_end, do, scale, dtype, chunk, position_ids=None, window=None, softcap=None):
    """Tree attention in ``dtype`` over chunks of query rows: out [B, Hq, L, D] and dq, dk, dv of sum(out * do);
    with ``window`` over ``position_ids [B, L]`` and ``softcap`` as tree_attention's."""
    B, HQ, L, D = q.shape
    group = HQ // k.shape[1]
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    key = torch.arange(L, device=q.device)
    for b in range(B):
        for h in range(HQ):
            for s in range(0, L, chunk):
                rows = key[s:s + chunk]
                visible = (key[None, :] <= rows[:, None]) & (rows[:, None] < subtree_end[b][None, :])
                if window is not None:
                    visible &= position_ids[b, s:s + chunk, None] - position_ids[b][None, :] < window
                scores = (qd[b, h, s:s + chunk] @ kd[b, h // group].t()) * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
                o = p @ vd[b, h // group]
                (o * do[b, h, s:s + chunk].to(dtype)).sum().backward()
                out[b, h, s:s + chunk] = o.detach()
    return out, qd.grad, kd.grad, vd.grad


def tree_layout(dry_run, big):
    """(subtree_end [B, L], position_ids [B, L]): random PACT-shaped tries (two, padded with single-token roots
    at position 0) or the W-group trie."""
    from pact_fast.packing import pack_tree

    if big:
        from bench_group import WORKLOADS, make_group

        seqs, _ = make_group(WORKLOADS["tiny" if dry_run else "W-group"])
        packed = pack_tree(seqs)
        return packed.subtree_end[None], packed.position_ids[None]
    from trees import random_tree_sequences

    packs = [pack_tree(random_tree_sequences(s, d)) for s, d in ((3, 3), (11, 2))]
    L = max(p.num_tokens for p in packs)
    ends = torch.stack([torch.cat([p.subtree_end, torch.arange(p.num_tokens + 1, L + 1)]) for p in packs])
    positions = torch.stack([torch.cat([p.position_ids, torch.zeros(L - p.num_tokens, dtype=torch.long)])
                             for p in packs])
    return ends, positions


def check_tree_case(name, HQ, HKV, D, dtype_name, device, dry_run, big=False, chunk=2048, **options):
    """One case: Triton tree_attention (the GPU tile configuration on CUDA) vs float64. ``options`` go to
    tree_attention (e.g. ``dq_mode``; ``window`` and ``softcap`` also to the plain-PyTorch path and the
    reference); the deterministic backward (dq_mode "split") must also repeat bit for bit."""
    from pact_fast.ops import tree_attention as tree_attention_op

    subtree_end, position_ids = (t.to(device) for t in tree_layout(dry_run, big))
    attn = {"window": options.get("window"), "softcap": options.get("softcap")}
    triton_only = {k: v for k, v in options.items() if k not in attn}

    def tree_attention(*args, **kwargs):
        return tree_attention_op(*args, **kwargs, position_ids=position_ids, **attn,
                                 **(triton_only if kwargs.get("backend") == "triton" else {}))

    dtype = DTYPES[dtype_name]
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(HQ * 100 + D)
    q, k, v, do = (torch.randn(B, h, L, D, generator=g).to(device) for h in (HQ, HKV, HKV, HQ))
    scale = D ** -0.5
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = tree_attention(*leaves, subtree_end, backend="triton")
    out.backward(do.to(dtype))
    ours = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    dtypes_ok = all(t.dtype == dtype for t in ours.values())
    repeats = True
    deterministic = options.get("dq_mode", "split") == "split"
    if deterministic:
        again = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        tree_attention(*again, subtree_end, backend="triton").backward(do.to(dtype))
        repeats = all(torch.equal(a.grad, b) for a, b in zip(again, (ours["dq"], ours["dk"], ours["dv"])))
    del leaves, out
    ref = dict(zip(ours, tree_reference(q, k, v, subtree_end, do, scale, torch.float64, chunk, position_ids, **attn)))
    errors = {key: rel_err(val, ref[key]) for key, val in ours.items()}
    plain = {key: None for key in ours}
    try:  # plain PyTorch in the same dtype: SDPA per segment over gathered ancestors
        qp, kp, vp = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out_p = tree_attention(qp, kp, vp, subtree_end, backend="varlen")
        out_p.backward(do.to(dtype))
        plain = {key: rel_err(val, ref[key]) for key, val in
                 zip(ours, (out_p.detach(), qp.grad, kp.grad, vp.grad))}
    except (RuntimeError, NotImplementedError) as e:
        plain["note"] = f"plain-PyTorch {dtype_name} path failed: {type(e).__name__}: {str(e)[:120]}"
    finite = all(torch.isfinite(t).all().item() for t in ours.values())
    verdict_plain = {key: val for key, val in plain.items() if key != "note"}
    return {"kernel": "tree_attention", "case": name, "shape": {"B": B, "L": L, "HQ": HQ, "HKV": HKV, "D": D},
            "dtype": dtype_name, "options": options, "errors": errors, "plain_torch_errors": plain,
            "bitwise_repeatable": repeats if deterministic else None,
            "passed": bool(finite and dtypes_ok and repeats and _verdict(errors, verdict_plain))}


def tree_cases(dry_run):
    """(name, HQ, HKV, D, kwargs): GQA, MHA and MQA on random tries, each dq mode, a sliding window with a logit
    softcap (window shorter than the sequences); the W-group layer's heads on its trie."""
    if dry_run:
        return [("gqa2-D16", 4, 2, 16, {}), ("mqa-D16", 2, 1, 16, {}), ("gqa2-D16-atomic", 4, 2, 16, {"dq_mode": "atomic"}),
                ("gqa2-D16-window-softcap", 4, 2, 16, {"window": 5, "softcap": 2.0}),
                ("W-group-tiny", 4, 2, 16, {"big": True})]
    return [("gqa2-D128", 16, 8, 128, {}), ("mha-D64", 4, 4, 64, {}), ("mqa-D64", 8, 1, 64, {}),
            ("gqa3-D128", 12, 4, 128, {}), ("gqa2-D128-atomic", 16, 8, 128, {"dq_mode": "atomic"}),
            ("gqa2-D128-window-softcap", 16, 8, 128, {"window": 8, "softcap": 2.0}),
            ("gqa2-D128-window-atomic", 16, 8, 128, {"window": 8, "dq_mode": "atomic"}),
            ("W-group-layer", 16, 8, 128, {"big": True})]


# ---------------------------------------------------------------------------------------------
# fused_pact_head
# ---------------------------------------------------------------------------------------------

def check_head_case(name, shape, dtype_name, device, c_ent=0.0):
    """One case: the Triton fused PACT head (loss, d hidden, d weight) vs its torch backend in float64 on the same
    rounded inputs, beside the torch backend in the same dtype. ``shape``: bench_fused_pact_head's B, T, S, E, H,
    V (a PACT micro-batch's scored rows); c_ent > 0 takes the ordinary (entropy) path, 0 the shift path."""
    from bench_fused_pact_head import make_inputs

    from pact_fast.losses import PACTLossConfig
    from pact_fast.ops.fused_pact_head import fused_pact_head

    dtype = DTYPES[dtype_name]
    hidden, weight, targets, rows, batch = make_inputs(**shape, dtype=dtype, device=device)
    config = PACTLossConfig(c_ent=c_ent)

    def run(backend, run_dtype):
        h, w = (t.to(run_dtype).detach().requires_grad_() for t in (hidden, weight))
        loss = fused_pact_head(h, w, targets, rows, batch, config, 0.3, backend=backend)[0]
        loss.backward()
        return {"loss": loss.detach().reshape(1), "d_hidden": h.grad, "d_weight": w.grad}

    t0 = time.perf_counter()
    ours = run("triton", dtype)
    kernel_s = time.perf_counter() - t0
    ref = run("torch", torch.float64)
    errors = {k: rel_err(v, ref[k]) for k, v in ours.items()}
    plain_out = run("torch", dtype)
    plain = {k: rel_err(v, ref[k]) for k, v in plain_out.items()}
    finite = all(torch.isfinite(v).all().item() for v in ours.values())
    dtypes_ok = ours["d_hidden"].dtype == dtype and ours["d_weight"].dtype == dtype
    return {"kernel": "fused_pact_head", "case": name, "shape": shape, "dtype": dtype_name, "c_ent": c_ent,
            "errors": errors, "plain_torch_errors": plain, "kernel_s": kernel_s,
            "passed": bool(finite and dtypes_ok and _verdict(errors, plain))}


def head_cases(dry_run):
    """(name, shape, kwargs): both of the head's paths (shift, and ordinary with the entropy bonus) at a small
    shape; on CUDA also the W-logprob rows (N=32,768, H=2,048, V=151,936)."""
    small = dict(B=4, T=16, S=1, E=32, H=64, V=1000) if dry_run else dict(B=8, T=64, S=2, E=128, H=256, V=32000)
    cases = [("small", small, {}), ("small-entropy", small, {"c_ent": 0.01})]
    if not dry_run:
        cases.append(("W-logprob-H2048", dict(B=64, T=224, S=4, E=1024, H=2048, V=151936), {}))
    return cases


# ---------------------------------------------------------------------------------------------

def _guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # a crash in one case is a failed check, not a lost section
        name = args[0] if args else "?"
        return {"case": name, "passed": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def run(dry_run, device):
    """{'linear_logprobs': [case dicts], 'tree_attention': [case dicts] or {'skipped': reason},
    'fused_pact_head': [case dicts]}."""
    results = {"linear_logprobs": [], "tree_attention": [], "fused_pact_head": []}

    def record(kernel, case):
        results[kernel].append(case)
        print(json.dumps({k: case.get(k) for k in ("kernel", "case", "dtype", "passed", "errors", "error")}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, N, H, V, kw in logprob_cases(dry_run):
        for dtype_name in DTYPES:
            record("linear_logprobs", {"kernel": "linear_logprobs", **_guarded(
                check_logprob_case, name, N, H, V, dtype_name, device, **kw), "dtype": dtype_name})
    try:
        importlib.import_module("pact_fast.kernels.tree_attention_launch")
    except ImportError as e:
        results["tree_attention"] = {"skipped": f"no Triton tree-attention kernels: {e}"}
        return results
    for name, HQ, HKV, D, kw in tree_cases(dry_run):
        for dtype_name in DTYPES:
            record("tree_attention", {"kernel": "tree_attention", **_guarded(
                check_tree_case, name, HQ, HKV, D, dtype_name, device, dry_run, **kw), "dtype": dtype_name})
    for name, shape, kw in head_cases(dry_run):
        for dtype_name in DTYPES:
            record("fused_pact_head", {"kernel": "fused_pact_head", **_guarded(
                check_head_case, name, shape, dtype_name, device, **kw), "dtype": dtype_name})
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from common import json_target_error, machine_info

    if args.json and json_target_error(args.json):  # before the checks run
        ap.error(json_target_error(args.json))
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry-run on the CPU")
    results = run(args.dry_run, device)
    if args.json:
        doc = {"section": "check", "dry_run": args.dry_run, "machine": machine_info(device),
               "criterion": f"relative error vs float64 < {TOL} and <= max(2 x plain PyTorch, {FLOOR})",
               "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    cases = results["linear_logprobs"] + (results["tree_attention"] if isinstance(results["tree_attention"], list)
                                          else [])
    failed = [f"{c.get('kernel')}/{c['case']}/{c['dtype']}" for c in cases if not c["passed"]]
    print(f"gpu_check: {len(cases) - len(failed)}/{len(cases)} cases passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
