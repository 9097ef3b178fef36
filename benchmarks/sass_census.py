"""Static SASS census of the backward main pass's state loop (CPU only: nvcc + nvdisasm, no GPU).

Builds csrc/selective_scan/ss2d_bwd_<dtype>.cu for sm_90 with -lineinfo, prints ptxas' registers and
spills of every `ss2d_bwd_main_kernel`, and for `ss2d_bwd_main_kernel<T, NMAX>` the body of the state
loop of `bwd_subtile` (the runtime `for (int n = 0; n < N; ++n)`, one copy per walk direction KK):
instructions per state and sub-tile by class and by source line, and per element-state (/ kBwdTile
positions). The loop is found as the backward branch whose source line is that `for` statement.

    python benchmarks/sass_census.py [--dtype bf16] [--nmax 16] [--lines]
    python benchmarks/sass_census.py --nmax 4 --whole 40     # the whole kernel: loops, top source lines

nvdisasm is taken from PATH, $CUDA_HOME/bin, or the copy bundled with Triton's NVIDIA backend.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from csrc_build import NVCC_FLAGS  # noqa: E402

KERNEL = ROOT / "csrc" / "selective_scan" / "ss2d_bwd_kernel.cuh"
DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
CLASSES = [  # (class, opcode prefixes); first match wins
    ("FP", ("FMUL", "FFMA", "FADD", "MUFU", "FMNMX", "FCHK")),
    ("FSEL", ("FSEL",)),
    ("SHFL", ("SHFL",)),
    ("shared", ("LDS", "STS", "LDSM")),
    ("global", ("LDG", "STG", "RED", "ATOM", "LD", "ST")),
    ("ctrl", ("BRA", "BAR", "WARPSYNC", "EXIT", "BSSY", "BSYNC", "NOP", "CALL", "RET")),
]


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    try:
        import triton.backends.nvidia as tn
        cands.append(Path(tn.__file__).parent / "bin" / name)
    except ImportError:
        pass
    for c in cands:
        if c.exists():
            return str(c)
    raise SystemExit(f"{name} not found (PATH, $CUDA_HOME/bin, triton's NVIDIA backend)")


def opclass(op: str) -> str:
    for name, prefixes in CLASSES:
        if any(op == p or op.startswith(p + ".") for p in prefixes):
            return name
    return "int"  # IMAD, IADD3, LEA, SHF, LOP3, MOV, ISETP, SEL, PLOP3, S2R, LDC and the uniform ops


def build(dtype: str, out: Path) -> tuple[Path, str]:
    cu = ROOT / "csrc" / "selective_scan" / f"ss2d_bwd_{dtype}.cu"
    cubin = out / f"bwd_{dtype}.cubin"
    cmd = [tool("nvcc"), "-cubin", str(cu), "-o", str(cubin), *NVCC_FLAGS, "-arch=sm_90", f"-I{ROOT / 'csrc'}",
           "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return cubin, r.stderr


def resources(ptxas: str) -> dict[str, str]:
    """Registers and spills of each main-pass kernel, from ptxas -v."""
    out, cur = {}, None
    for ln in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", ln)
        if m:
            cur = m.group(1) if "ss2d_bwd_main_kernel" in m.group(1) else None
            continue
        if cur and "spill" in ln:
            out[cur] = ln.strip()
        elif cur and "registers" in ln:
            out[cur] = re.search(r"Used (\d+) registers", ln).group(0) + "; " + out.get(cur, "")
    return out


def parse(sass: str, fn: str):
    """Instructions (address, text, source line) of function fn, and its label addresses."""
    body = sass.split(f".text.{fn}:", 1)[1].split("\n.text.", 1)[0].split("//----------", 1)[0]
    ins, labels, pend, cur = [], {}, [], None
    for ln in body.splitlines():
        m = re.search(r'//## File "(.*?)", line (\d+)', ln)
        if m:
            cur = (Path(m.group(1)).name, int(m.group(2)))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", ln)
        if m:
            pend.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if m:
            a = int(m.group(1), 16)
            labels.update({p: a for p in pend})
            pend = []
            ins.append((a, m.group(2), cur))
    return ins, labels


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def state_loop_line() -> int:
    src = KERNEL.read_text().splitlines()
    start = next(i for i, s in enumerate(src) if "void bwd_subtile(" in s)
    end = next(i for i in range(start + 1, len(src)) if src[i].startswith("}"))
    return next(i for i in range(start, end) if re.match(r"\s*for \(int n = 0; n < N;", src[i])) + 1


def census(dtype: str, nmax: int, show_lines: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptxas = build(dtype, Path(tmp))
        sass = subprocess.run([tool("nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    print(f"ptxas sm_90, ss2d_bwd_main_kernel<{DTYPES[dtype]}, NMAX>:")
    def nmax_of(name):
        return int(re.search(r"Li(\d+)E", name).group(1))
    for fn, res in sorted(resources(ptxas).items(), key=lambda kv: nmax_of(kv[0])):
        print(f"  NMAX {nmax_of(fn):>2}: {res}")
    fn = next(f for f in re.findall(r"\.text\.(\w+):", sass)
              if "ss2d_bwd_main_kernel" in f and f"Li{nmax}E" in f)
    ins, labels = parse(sass, fn)
    line = state_loop_line()
    loops = []
    for a, t, src in ins:
        m = re.search(r"BRA\s.*?(\.L_x_\d+)", t)
        if m and labels.get(m.group(1), 1 << 62) <= a and src == (KERNEL.name, line):
            loops.append((labels[m.group(1)], a))
    src_text = KERNEL.read_text().splitlines()
    print(f"\n{fn}: {len(ins)} SASS instructions; state loop (line {line}) copies: {len(loops)}")
    for lo, hi in loops:
        body = [(t, s) for a, t, s in ins if lo <= a <= hi]
        cls = collections.Counter(opclass(opcode(t)) for t, _ in body)
        ops = collections.Counter(opcode(t).split(".")[0] for t, _ in body)
        print(f"\n  loop {lo:#x}..{hi:#x}: {len(body)} per state and sub-tile, {len(body) / 16:.2f} per element-state")
        print("   ", ", ".join(f"{k} {v}" for k, v in cls.most_common()))
        print("   ", ", ".join(f"{k} {v}" for k, v in ops.most_common()))
        if show_lines:
            per_line = collections.Counter(s for _, s in body)
            for (f, ln), n in sorted(per_line.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or 0)):
                text = src_text[ln - 1].strip()[:90] if f == KERNEL.name else ""
                print(f"    {n:4d}  {f}:{ln:<4d} {text}")


def whole(dtype: str, nmax: int, top: int) -> None:
    """Static census of the whole main-pass kernel: its loops (backward branches, innermost first)
    and the instructions per source line (inlined helpers under their own lines). Static counts:
    weight each loop by its trip count by hand (per sub-tile: the state loop runs N times, the
    staging loops rows * TB / nth, the rest once)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, _ = build(dtype, Path(tmp))
        sass = subprocess.run([tool("nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    fn = next(f for f in re.findall(r"\.text\.(\w+):", sass)
              if "ss2d_bwd_main_kernel" in f and f"Li{nmax}E" in f)
    ins, labels = parse(sass, fn)
    sources = {}

    def text(src):
        if src is None:
            return "?"
        if src[0] not in sources:
            hits = list(ROOT.glob(f"csrc/**/{src[0]}"))
            sources[src[0]] = hits[0].read_text().splitlines() if hits else []
        lines = sources[src[0]]
        return f"{src[0]}:{src[1]} " + (lines[src[1] - 1].strip()[:80] if 0 < src[1] <= len(lines) else "")

    print(f"{fn}: {len(ins)} SASS instructions")
    loops = sorted(((labels[m.group(1)], a, src) for a, t, src in ins
                    for m in [re.search(r"BRA\s.*?(\.L_x_\d+)", t)] if m and labels.get(m.group(1), 1 << 62) <= a),
                   key=lambda x: x[1] - x[0])
    print(f"\nloops ({len(loops)}), innermost first: size, branch's source line")
    for lo, hi, src in loops:
        n = sum(1 for a, _, _ in ins if lo <= a <= hi)
        print(f"  {lo:#07x}..{hi:#07x} {n:5d}  {text(src)}")
    per_line = collections.Counter(src for _, _, src in ins)
    print(f"\ninstructions per source line (top {top}):")
    for src, n in per_line.most_common(top):
        print(f"  {n:5d}  {text(src)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--nmax", type=int, default=16, choices=[4, 8, 16, 32, 64])
    ap.add_argument("--lines", action="store_true", help="per source line as well")
    ap.add_argument("--whole", type=int, metavar="TOP", default=0,
                    help="the whole kernel instead: its loops and its TOP source lines by instructions")
    args = ap.parse_args()
    if args.whole:
        whole(args.dtype, args.nmax, args.whole)
    else:
        census(args.dtype, args.nmax, args.lines)
