"""The compile gate (SPEC section 5) in CI: every registered kernel and launch configuration
compiles for sm_90a and sm_80 with no spills (no stack, no local memory, no STL/LDL in the SASS), within
shared memory, at its CTAs per SM, on tensor cores; a deliberately spilling kernel is rejected.

The gate needs real JIT functions, so it runs in a subprocess without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    """Run Python in ``tmp_path`` without the interpreter, importing pact_fast from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)


@pytest.fixture(scope="module")
def gate_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    out = tmp / "gate.json"
    proc = _run(["-m", "pact_fast.compile_gate", "--json", str(out)], tmp)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_every_kernel_passes_the_gate(gate_rows):
    proc, rows = gate_rows
    failures = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0
    assert "registers" in proc.stdout and "shared_bytes" in proc.stdout  # the printed report


def test_gate_covers_every_kernel_on_both_architectures(gate_rows):
    _, rows = gate_rows
    names = {r["kernel"].split("[")[0] for r in rows}
    assert names == {"linear_logprobs.fwd", "linear_logprobs.bwd",
                     "tree_attention.fwd", "tree_attention.dq", "tree_attention.dkdv", "tree_attention.delta",
                     "tree_attention.cast", "fused_pact_head.pass", "fused_pact_head.scale", "fused_pact_head.grads"}
    for r in rows:
        if r["expects_mma"]:
            assert ("HGMMA" if r["arch"] == "sm_90" else "HMMA") in r["mma"].split(","), r
        assert r["local_bytes"] == r["stack_bytes"] == r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["ctas_per_sm"] >= r["min_ctas_per_sm"], r
        if r["kernel"].startswith("tree_attention."):  # issue 24: retiled to 2 CTAs per SM
            assert r["ctas_per_sm"] >= 2 and r["min_ctas_per_sm"] == 2, r
    per_arch = {}
    for r in rows:
        per_arch.setdefault(r["arch"], set()).add(r["kernel"])
    assert per_arch["sm_90"] == per_arch["sm_80"]


def test_gate_rejects_a_kernel_without_tensor_cores(tmp_path):
    # A kernel that should multiply tiles but does not must fail the MMA rule.
    script = tmp_path / "neg.py"
    script.write_text(textwrap.dedent("""
        import triton, triton.language as tl
        from pact_fast.compile_gate import compile_entry
        from pact_fast.kernels.registry import GateEntry, LaunchConfig

        @triton.jit
        def copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)

        entry = GateEntry("copy", copy, {"x_ptr": "*bf16", "y_ptr": "*bf16"}, {"BLOCK": 128}, LaunchConfig({}))
        row = compile_entry(entry, 90)
        print("OK" if row["ok"] else "REJECTED: " + row["error"])
    """))
    proc = _run([str(script)], tmp_path)
    assert "REJECTED: no HGMMA" in proc.stdout, proc.stdout + proc.stderr


def _compile_script(tmp_path, body):
    """Run ``body`` (Python defining ``entry``) in a subprocess without the interpreter; returns the gate's row
    for entry on sm_90a as printed JSON."""
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import json, triton, triton.language as tl
        from pact_fast.compile_gate import compile_entry
        from pact_fast.kernels.registry import GateEntry, LaunchConfig
    """) + textwrap.dedent(body) + "\nprint('ROW ' + json.dumps(compile_entry(entry, 90)))\n")
    proc = _run([str(script)], tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[0][4:])


def test_gate_rejects_a_spilling_kernel(tmp_path):
    # 128 x 128 fp32 accumulator live across a loop in one warp: 512 values per thread, twice the 255 registers
    row = _compile_script(tmp_path, """
        @triton.jit
        def spill(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for i in range(n):
                acc = acc * tl.load(x_ptr + i) + tl.load(x_ptr + offs + i)
            tl.store(y_ptr + offs, acc)

        entry = GateEntry("spill", spill, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128},
                          LaunchConfig({}, num_warps=1), expects_mma=False)
    """)
    assert not row["ok"]
    assert row["stack_bytes"] > 0 and row["spill_stores"] > 0 and row["spill_loads"] > 0, row
    assert "stack" in row["error"] and "STL" in row["error"], row["error"]


def test_gate_accepts_a_small_clean_kernel(tmp_path):
    row = _compile_script(tmp_path, """
        @triton.jit
        def scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

        entry = GateEntry("scale", scale, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024},
                          LaunchConfig({}), expects_mma=False, min_ctas_per_sm=2)
    """)
    assert row["ok"], row["error"]
    assert row["stack_bytes"] == row["local_bytes"] == row["spill_stores"] == row["spill_loads"] == 0
    assert 0 < row["registers"] < 64 and row["ctas_per_sm"] == 16  # 4 warps: the 64-warp limit, not registers


def test_occupancy_limits():
    from pact_fast.compile_gate import occupancy

    assert occupancy(90, 255, 50_000, 4) == 2  # 8 warps of 256 x 32 registers fill the 64K register file
    assert occupancy(90, 128, 50_000, 8) == 2
    assert occupancy(90, 129, 50_000, 8) == 1  # 136 registers (granule of 8 per thread): 1 CTA of 8 warps
    assert occupancy(80, 64, 100 * 1024, 4) == 1  # shared memory: 2 x 101 KB > 164 KB
    assert occupancy(90, 64, 100 * 1024, 4) == 2  # 228 KB on sm_90
    assert occupancy(90, 16, 0, 1) == 32  # the CTA limit


def test_spill_instructions_are_counted_from_sass():
    from pact_fast.compile_gate import spill_instructions

    sass = """
        /*00c0*/                   STL [R1+0x9b0], R25 ;
        /*00d0*/                   STL.64 [R1+0x8], R2 ;
        /*00e0*/                   LDL.LU R4, [R1+0x9b0] ;
        /*00f0*/                   STS [R3], R4 ;
        /*0100*/                   LDS.U16 R5, [R3] ;
    """
    assert spill_instructions(sass) == (2, 1)


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_a_worker_count_below_one_is_one_line(workers, capsys):
    """--workers -1 ended in ProcessPoolExecutor's ValueError traceback; 0 silently meant one per core."""
    from pact_fast.compile_gate import main

    with pytest.raises(SystemExit) as exc:
        main(["--workers", workers])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--workers {workers}: at least 1 process" in err and "Traceback" not in err
