"""The stored SASS table (bench/results/roofline_sass.json) the time model reads without a toolchain is what the
kernels compile to now: every entry the model prices is compiled for sm_90a here (triton's bundled ptxas and
cuobjdump, in a subprocess without TRITON_INTERPRET, as the compile gate runs) and its warp-instructions per
element equal the stored ones. Refresh with ``python bench/sass.py --json bench/results/roofline_sass.json``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parent.parent


def test_stored_sass_table_is_what_the_kernels_compile_to(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), "--json", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(out.read_text())["profiles"]
    stored_doc = json.loads((ROOT / "bench" / "results" / "roofline_sass.json").read_text())
    stored = stored_doc["profiles"]
    assert set(fresh) == set(stored)
    for name, p in fresh.items():
        assert 0 < p["loop_instructions"] <= p["total_instructions"], name
        assert p["warp_instructions_per_element"] > 0, name
    looping = [n for n in fresh if n.startswith(("linear_logprobs", "fused_pact_head.pass", "tree_attention.fwd"))]
    assert all(fresh[n]["loop_instructions"] < fresh[n]["total_instructions"] for n in looping)  # a hot loop found
    if stored_doc["triton"] == triton.__version__:  # another triton compiles other SASS: counts not comparable
        assert {n: p["warp_instructions_per_element"] for n, p in fresh.items()} == \
            {n: p["warp_instructions_per_element"] for n, p in stored.items()}
