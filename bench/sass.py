"""Issue term of the performance model: warp-instructions per element, read from each kernel's sm_90a SASS.

A Triton epilogue that streams a tile of logits is bounded by how many instructions its warps issue, not only
by the bytes it moves. This module compiles a kernel exactly as the compile gate does (the entries of
``kernels/gate_entries.py``; ``pact_fast.compile_gate.ARCHS``; triton's bundled ``ptxas`` / ``cuobjdump``),
reads its SASS, finds the kernel's hot loop (the innermost backward branch with the most instructions; the
whole kernel when it has no loop) and divides the loop body's instructions, times the warps of a program, by
the elements one iteration handles (``ELEMENTS``). Every instruction of the body counts once per iteration,
predicated or not: a static count, so branches not taken are charged (an upper estimate of the body).

    python bench/sass.py                       # table of the kernels the model uses
    python bench/sass.py --json bench/results/roofline_sass.json   # refresh the stored table

``issue_table()`` returns {gate entry name: profile}; without the toolchain (no ``cuobjdump``, or under
``TRITON_INTERPRET=1``) it reads the stored table ``bench/results/roofline_sass.json`` instead and says so
in each profile's ``source``.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORED = ROOT / "bench" / "results" / "roofline_sass.json"
ARCH = 90  # sm_90a: H100 / H200

# Elements one iteration of a kernel's hot loop handles, from its constexpr tile sizes: a logit for the
# epilogues, a (query, key) score for attention (HEADS query heads stacked per program), a row of D for delta.
ELEMENTS = {
    "linear_logprobs.fwd": lambda c: c["BLOCK_R"] * c["BLOCK_S"],
    "linear_logprobs.bwd": lambda c: c["BLOCK_R"] * c["BLOCK_S"],
    "fused_pact_head.pass": lambda c: c["BLOCK_R"] * c["BLOCK_V"],
    "fused_pact_head.scale": lambda c: c["BLOCK_R"] * c["BLOCK_H"],
    "tree_attention.fwd": lambda c: c.get("HEADS", 1) * c["BLOCK_M"] * c["BLOCK_N"],
    "tree_attention.dq": lambda c: c.get("HEADS", 1) * c["BLOCK_M"] * c["BLOCK_N"],
    "tree_attention.dkdv": lambda c: c["BLOCK_M"] * c["BLOCK_N"],
    "tree_attention.delta": lambda c: c["BLOCK_R"] * c["BLOCK_D"],
    "tree_attention.cast": lambda c: c["BLOCK"],
}

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+|\.L_x_\d+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def family(entry_name):
    """``"linear_logprobs.fwd[bf16-first]"`` -> ``"linear_logprobs.fwd"``."""
    return entry_name.split("[", 1)[0]


def toolchain_ready():
    """True when kernels can be compiled and disassembled here (cuobjdump found, not interpreting)."""
    from pact_fast.compile_gate import _tool
    from pact_fast.kernels.registry import interpreting

    return not interpreting() and _tool("cuobjdump") is not None


def kernel_sass(entry, arch=ARCH):
    """The SASS text of one GateEntry compiled for ``sm_{arch}`` as the compile gate builds it (its options and
    alignment hints: ``pact_fast.compile_gate.build``)."""
    from pact_fast.compile_gate import build, disassemble

    return disassemble(build(entry, arch), "-sass")[0]


def parse(sass):
    """[(address, text)] of every instruction in program order (cuobjdump: ``/*0960*/  @!P0 BRA 0x48f0 ;``), and
    {label: address} where the disassembler prints labels (``.L_x_3:``, nvdisasm) instead of addresses."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.search(line)
        if m and m.group(2):
            address = int(m.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            instructions.append((address, m.group(2)))
    return instructions, labels


def loops(sass):
    """[(first, last)] instruction indices of every loop: a branch at ``last`` back to ``first`` < last. The
    trailing ``BRA`` to itself after EXIT is not a loop."""
    instructions, labels = parse(sass)
    index = {address: i for i, (address, _) in enumerate(instructions)}
    out = []
    for i, (address, text) in enumerate(instructions):
        m = _BRANCH.search(text)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1).startswith(".") else int(m.group(1), 16)
        if target is not None and target < address and target in index:
            out.append((index[target], i))
    return out


# Kernels whose hot loop is their first: the fused head's pass has a second loop that runs only for rows past its
# shift limit (a target less likely than ~e^-20), data dependent and none by default; the model prices its
# bytes (kernel_costs' bad_rows), not its instructions
FIRST_LOOP = {"fused_pact_head.pass"}


def hot_loop(sass, first=False):
    """(instructions in the hot loop's body, total instructions): the innermost loop with the largest body
    (innermost: contains no other loop), or with ``first`` the first innermost loop in program order; the whole
    kernel when there is none."""
    instructions, _ = parse(sass)
    found = loops(sass)
    inner = sorted((s, e) for s, e in found if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in found))
    sizes = [e - s + 1 for s, e in inner]
    body = (sizes[0] if first else max(sizes)) if sizes else len(instructions)
    return body, len(instructions)


def profile(entry, sass):
    """Issue profile of one GateEntry from its SASS: warp-instructions per element of the hot loop."""
    body, total = hot_loop(sass, first=family(entry.name) in FIRST_LOOP)
    elements = ELEMENTS[family(entry.name)](entry.constexprs)
    return {"entry": entry.name, "num_warps": entry.config.num_warps, "loop_instructions": body,
            "total_instructions": total, "elements_per_iteration": elements,
            "warp_instructions_per_element": body * entry.config.num_warps / elements}


def model_entries():
    """The GateEntries the performance model prices: every kernel the model uses, bf16 (W-logprob, W-group), as a
    vocabulary that is a multiple of 16 specialises it (``registry.odd_vocab`` builds left out), at the configuration
    launched on sm_90a (an entry of another architecture's configuration, e.g. sm_80's dk/dv tile, has the same
    name and would overwrite it)."""
    from pact_fast.kernels.gate_entries import all_gate_entries
    from pact_fast.kernels.registry import odd_vocab

    return [e for e in all_gate_entries() if "bf16" in e.name and "softcap" not in e.name
            and "window" not in e.name and not odd_vocab(e.name) and ARCH in e.archs]


def measure(entries=None):
    """{entry name: profile} compiled here; raises RuntimeError when the toolchain is missing."""
    if not toolchain_ready():
        raise RuntimeError("bench/sass.py: no cuobjdump here, or TRITON_INTERPRET=1: cannot read SASS")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the compile gate builds them
    out = {}
    for entry in entries or model_entries():
        out[entry.name] = {**profile(entry, kernel_sass(entry)), "source": f"SASS sm_{ARCH}a, compiled here"}
    return out


def stored():
    """The stored table (bench/results/roofline_sass.json), each profile's source saying so."""
    doc = json.loads(STORED.read_text())
    note = f"stored table {STORED.relative_to(ROOT)} (triton {doc['triton']}), no toolchain here"
    return {name: {**p, "source": note} for name, p in doc["profiles"].items()}


def issue_table(compile_here=None):
    """{entry name: profile}: compiled here when the toolchain is ready (``compile_here`` None or True), else the
    stored table. ``compile_here=False`` always reads the stored table."""
    if compile_here is None:
        compile_here = toolchain_ready()
    return measure() if compile_here else stored()


def per_element(table, kernel, tag=""):
    """Warp-instructions per element of a kernel family ("linear_logprobs.fwd"): the most over its entries whose
    name contains ``tag`` (e.g. "d128-heads2"): the model prices the costliest specialisation it may launch."""
    values = [p["warp_instructions_per_element"] for name, p in table.items()
              if family(name) == kernel and tag in name]
    if not values:
        raise KeyError(f"bench/sass.py: no issue profile for {kernel!r}; refresh {STORED.name}")
    return max(values)


def entry_per_element(table, entry_name):
    """Warp-instructions per element of one gate entry by its full name ("tree_attention.dkdv[bf16-d128]")."""
    if entry_name not in table:
        raise KeyError(f"bench/sass.py: no issue profile for {entry_name!r}; refresh {STORED.name}")
    return table[entry_name]["warp_instructions_per_element"]


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the table here (the stored table: bench/results/roofline_sass.json)")
    args = ap.parse_args(argv)
    from common import json_target_error

    if args.json and json_target_error(args.json):  # before every kernel is compiled
        ap.error(json_target_error(args.json))
    table = measure()
    for name, p in table.items():
        print(f"{name:48} warps {p['num_warps']} loop {p['loop_instructions']:5d} of {p['total_instructions']:5d} "
              f"instr  {p['elements_per_iteration']:6d} el/iter  {p['warp_instructions_per_element']:.3f} "
              "warp-instr/element")
    if args.json:
        profiles = {n: {k: v for k, v in p.items() if k != "source"} for n, p in table.items()}
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": f"sm_{ARCH}a",
                                               "profiles": profiles}, indent=1) + "\n")


if __name__ == "__main__":
    main()
