"""Compile gate: every Triton kernel, at every launch configuration, built for real GPUs here.

The Triton interpreter accepts code that the GPU compiler rejects and says nothing about
speed. This gate compiles each entry of ``pact_fast.kernels.gate_entries`` to a CUDA binary for
sm_90a (H100/H200) and sm_80 (A100) on a machine without a GPU, then reads the binary with
``cuobjdump``: registers, shared memory, stack and local memory, the local-memory loads and stores
(``LDL`` / ``STL``, i.e. register spills) in the SASS, tensor-core instructions, and the CTAs per SM that
the registers, shared memory and threads allow (``occupancy``).

    python -m pact_fast.compile_gate            # table of every kernel and configuration
    python -m pact_fast.compile_gate --json F   # also write the rows as JSON

Exit status 1 when any entry fails a rule: no spills (``STACK`` and ``LOCAL`` both 0 and no ``LDL`` /
``STL`` in the SASS: ptxas puts spilled registers in the stack frame, so ``LOCAL`` alone misses them),
shared memory within the budget, at least ``GateEntry.min_ctas_per_sm`` CTAs per SM, HGMMA (sm_90a) /
HMMA (sm_80) in kernels that multiply 16-bit tiles.
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

# Per architecture (CUDA C Programming Guide, "Compute Capabilities" table): "smem" the most shared memory one
# CTA may use, "smem_sm" per SM; 64K 32-bit registers, 64 resident warps and 32 resident CTAs per SM on both.
ARCHS = {90: {"smem": 227 * 1024, "smem_sm": 228 * 1024, "mma": "HGMMA"},
         80: {"smem": 163 * 1024, "smem_sm": 164 * 1024, "mma": "HMMA"}}
REGS_PER_SM, WARPS_PER_SM, CTAS_PER_SM = 65536, 64, 32
REG_GRANULE = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # shared memory the driver reserves per CTA (sm_80 and later)


def occupancy(arch, registers, shared_bytes, num_warps):
    """Resident CTAs per SM for a kernel of ``registers`` per thread, ``shared_bytes`` per CTA and ``num_warps``
    warps per CTA on ``arch`` (80 or 90): the least of the register, shared-memory, warp and CTA limits."""
    regs_per_warp = -(-registers * 32 // REG_GRANULE) * REG_GRANULE
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps if registers else CTAS_PER_SM
    by_smem = ARCHS[arch]["smem_sm"] // (shared_bytes + SMEM_RESERVED)
    return min(by_regs, by_smem, WARPS_PER_SM // num_warps, CTAS_PER_SM)


def spill_instructions(sass):
    """(stores, loads): local-memory stores (STL) and loads (LDL) in SASS text, the instructions of spills."""
    ops = re.findall(r"\b(STL|LDL)(?:\.[\w]+)*\s", sass)
    return ops.count("STL"), ops.count("LDL")


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _alignment_attrs(entry):
    """Triton's divisibility hints for ``entry.aligned`` (the attrs format of triton >= 3.3)."""
    if not entry.aligned:
        return None
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        raise RuntimeError(f"compile gate: {entry.name} has alignment hints, which need triton >= 3.3 to compile")
    return {(entry.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in entry.aligned}


def build(entry, arch):
    """Triton's compiled kernel of one GateEntry for ``sm_{arch}``: its constexprs, launch options and alignment
    hints, as a launch on that GPU specialises it (the gate and bench/sass.py read the same build)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=entry.kernel, signature={**entry.signature, **{k: "constexpr" for k in entry.constexprs}},
                                    constexprs=entry.constexprs, attrs=_alignment_attrs(entry))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": entry.config.num_warps, "num_stages": entry.config.num_stages})


def disassemble(compiled, *flags):
    """``cuobjdump <flag>``'s output on a compiled kernel's cubin, one string per flag ("-sass",
    "--dump-resource-usage")."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        return [subprocess.run([_tool("cuobjdump"), flag, cubin], capture_output=True, text=True, check=True).stdout
                for flag in flags]
    finally:
        os.unlink(cubin)


def compile_entry(entry, arch):
    """Build one GateEntry for one architecture; returns a row of measurements and verdicts."""
    row = {"kernel": entry.name, "arch": f"sm_{arch}", "num_warps": entry.config.num_warps,
           "num_stages": entry.config.num_stages, **{k: v for k, v in entry.config.blocks.items()}}
    try:
        compiled = build(entry, arch)
    except Exception as exc:  # the gate reports any compiler rejection as a failure row
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    usage, sass = disassemble(compiled, "--dump-resource-usage", "-sass")
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    shared = int(fields.get("SHARED", 0)) + int(compiled.metadata.shared)
    mma = sorted({m for m in re.findall(r"\b(HGMMA|HMMA|IMMA)\b", sass)})
    spill_stores, spill_loads = spill_instructions(sass)
    registers = int(fields.get("REG", 0))
    row.update(registers=registers, shared_bytes=shared, local_bytes=int(fields.get("LOCAL", 0)),
               stack_bytes=int(fields.get("STACK", 0)), spill_stores=spill_stores, spill_loads=spill_loads,
               ctas_per_sm=occupancy(arch, registers, shared, entry.config.num_warps),
               min_ctas_per_sm=entry.min_ctas_per_sm, mma=",".join(mma) or "-", expects_mma=entry.expects_mma)
    problems = []
    if row["local_bytes"]:
        problems.append(f"{row['local_bytes']} B local memory")
    if row["stack_bytes"]:
        problems.append(f"{row['stack_bytes']} B stack")
    if spill_stores or spill_loads:
        problems.append(f"{spill_stores} STL / {spill_loads} LDL in SASS (spills)")
    if shared > ARCHS[arch]["smem"]:
        problems.append(f"shared {shared} B > budget {ARCHS[arch]['smem']} B")
    if row["ctas_per_sm"] < entry.min_ctas_per_sm:
        problems.append(f"{row['ctas_per_sm']} CTAs per SM < {entry.min_ctas_per_sm}")
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
    jobs = [(i, arch) for i, entry in enumerate(all_gate_entries()) for arch in ARCHS if arch in entry.archs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_job, jobs))


def format_table(rows):
    cols = ["kernel", "arch", "num_warps", "num_stages", "registers", "shared_bytes", "stack_bytes", "local_bytes",
            "spill_stores", "spill_loads", "ctas_per_sm", "mma", "ok"]
    lines = [text_table(rows, cols)]
    lines += [f"FAIL {r['kernel']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pact_fast.compile_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel compiler processes (default: one per core; each build takes tens of seconds)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1 process (leave it out for one per core)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = run_gate(args.workers)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
