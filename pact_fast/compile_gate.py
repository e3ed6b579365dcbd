"""Compile gate: every Triton kernel, at every launch configuration, built for real GPUs here.

The Triton interpreter accepts code that the GPU compiler rejects and says nothing about
speed. This gate compiles each entry of ``pact_fast.kernels.gate_entries`` to a CUDA binary for
sm_90a (H100/H200) and sm_80 (A100) on a machine without a GPU, then reads the binary with
``cuobjdump``: registers, shared memory, local memory (spills) and tensor-core instructions.

    python -m pact_fast.compile_gate            # table of every kernel and configuration
    python -m pact_fast.compile_gate --json F   # also write the rows as JSON

Exit status 1 when any entry fails a rule: no local memory, shared memory within the
budget, HGMMA (sm_90a) / HMMA (sm_80) in kernels that multiply 16-bit tiles.
Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT functions).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .tables import text_table

ARCHS = {90: {"smem": 227 * 1024, "mma": "HGMMA"}, 80: {"smem": 163 * 1024, "mma": "HMMA"}}


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def compile_entry(entry, arch):
    """Build one GateEntry for one architecture; returns a row of measurements and verdicts."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=entry.kernel, signature={**entry.signature, **{k: "constexpr" for k in entry.constexprs}},
                                    constexprs=entry.constexprs)
    row = {"kernel": entry.name, "arch": f"sm_{arch}", "num_warps": entry.config.num_warps,
           "num_stages": entry.config.num_stages, **{k: v for k, v in entry.config.blocks.items()}}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": entry.config.num_warps, "num_stages": entry.config.num_stages})
    except Exception as exc:  # the gate reports any compiler rejection as a failure row
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    shared = int(fields.get("SHARED", 0)) + int(compiled.metadata.shared)
    mma = sorted({m for m in re.findall(r"\b(HGMMA|HMMA|IMMA)\b", sass)})
    row.update(registers=int(fields.get("REG", 0)), shared_bytes=shared, local_bytes=int(fields.get("LOCAL", 0)),
               mma=",".join(mma) or "-", expects_mma=entry.expects_mma)
    problems = []
    if row["local_bytes"]:
        problems.append(f"{row['local_bytes']} B local memory (spills)")
    if shared > ARCHS[arch]["smem"]:
        problems.append(f"shared {shared} B > budget {ARCHS[arch]['smem']} B")
    if entry.expects_mma and ARCHS[arch]["mma"] not in mma:
        problems.append(f"no {ARCHS[arch]['mma']} in SASS")
    row["ok"] = not problems
    row["error"] = "; ".join(problems)
    return row


def _job(args):
    index, arch = args
    from pact_fast.kernels.gate_entries import all_gate_entries

    return compile_entry(all_gate_entries()[index], arch)


def run_gate(workers=None):
    """Compile every registered entry for every architecture; returns the rows."""
    from pact_fast.kernels.gate_entries import all_gate_entries
    from pact_fast.kernels.registry import interpreting

    if interpreting():
        raise RuntimeError("the compile gate needs real JIT functions: unset TRITON_INTERPRET")
    jobs = [(i, arch) for i in range(len(all_gate_entries())) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_job, jobs))


def format_table(rows):
    cols = ["kernel", "arch", "num_warps", "num_stages", "registers", "shared_bytes", "local_bytes", "mma", "ok"]
    lines = [text_table(rows, cols)]
    lines += [f"FAIL {r['kernel']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiler processes")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = run_gate(args.workers)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
