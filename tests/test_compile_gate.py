"""The compile gate (SPEC section 5) in CI: every registered kernel and launch configuration
compiles for sm_90a and sm_80 with no spills, within shared memory, on tensor cores.

The gate needs real JIT functions, so it runs in a subprocess without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
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
                     "tree_attention.cast", "fused_pact_head.pass", "fused_pact_head.scale"}
    for r in rows:
        if r["expects_mma"]:
            assert r["mma"] == ("HGMMA" if r["arch"] == "sm_90" else "HMMA"), r
        assert r["local_bytes"] == 0
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
