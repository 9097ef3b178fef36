"""Compile every Triton kernel launch of the package for a GPU on a machine without one.

The CPU interpreter accepts code the compiler rejects (a helper returning None on one branch, an
int argument specialised into a constexpr): a GPU call spent on that is lost. This script runs
small scan, CGM, norm-gate, layer_norm and dwconv calls with the GPU configuration, records each kernel launch instead of running
it, then compiles each distinct launch with ``triton.compile`` for the target, specialised on its
argument values as Triton's launcher does (ints equal to 1 become constants; multiples of 16 and
16-byte aligned pointers get the divisibility hint), and prints its registers, spills and shared
memory (from the cubin), so the next GPU call runs code that builds.

    python benchmarks/compile_offline.py [--arch 90] [--only NAME,...]  # exit status 1 when a launch fails to compile
    python benchmarks/compile_offline.py --only cgm --digest > before.txt   # then after a refactor: diff
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record() -> list[dict]:
    """Child process: the launches of a few forward+backward calls, not executed (outputs unset)."""
    os.environ["TRITON_INTERPRET"] = "1"       # kernels become Python objects: no GPU needed
    import torch
    import triton.runtime.interpreter as ti

    launches, seen = [], set()

    def kind(v):
        if isinstance(v, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}[v.dtype]
        if isinstance(v, bool):
            return "i1"
        if isinstance(v, int):
            return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        if isinstance(v, float):
            return "fp32"
        return None

    def run(self, *args, grid, warmup, **kwargs):
        names = list(self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount])
        args_k = {n: kind(a) for n, a in zip(names, args)}
        consts = {n: (a if kind(a) is None or not isinstance(a, torch.Tensor) else None)
                  for n, a in zip(names, args)}
        meta = {k: v for k, v in kwargs.items() if k not in names}
        rec = dict(module=self.fn.__module__, name=self.fn.__name__, args=args_k,
                   values={n: v for n, v in consts.items() if isinstance(v, (int, float, bool, str, type(None)))},
                   constexprs={k: v for k, v in kwargs.items() if k in names}, meta=meta,
                   aligned={n: a.data_ptr() % 16 == 0 for n, a in zip(names, args) if isinstance(a, torch.Tensor)})
        key = json.dumps(rec, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            launches.append(rec)

    ti.InterpretedFunction.run = run
    sys.path.insert(0, ROOT)
    import vmambax_kernels as vk
    from vmambax.models.fusion import CGM
    from vmambax_kernels.cgm import module_triton as cgm_module
    from vmambax_kernels.cgm import triton as cgm_triton
    from vmambax_kernels.norm_gate import triton as norm_gate_triton
    from vmambax_kernels.selective_scan import triton as scan_triton
    from vmambax_kernels.testing import ScanCase, scan_inputs
    for mod in (scan_triton, cgm_triton, norm_gate_triton):
        mod.interpreting = lambda: False        # the GPU's configuration (block sizes, grids)
    cgm_module.interpreting = lambda: False
    scan_triton._check = lambda *args, **kwargs: None   # it refuses CPU tensors outside the interpreter

    def backward(y, leaves):
        y.float().sum().backward()
        for t in leaves:
            t.grad = None

    for bwd in ("auto", "tile"):
        scan_triton._CONFIG_OVERRIDE.clear()
        scan_triton._CONFIG_OVERRIDE["bwd"] = bwd
        for dtype in (torch.float32, torch.bfloat16):
            for case in (ScanCase("enc", 2, 24, 16, 16, 16), ScanCase("dec", 2, 24, 16, 16, 4)):
                for lowrank in (False, True):
                    x = scan_inputs(case, dtype, "cpu", lowrank=lowrank)
                    leaves = [v.requires_grad_(True) for v in x.values() if isinstance(v, torch.Tensor)]
                    if lowrank:
                        y = scan_triton.selective_scan_2d_lowrank(
                            x["u"], x["dt"], x["dt_projs_weight"], x["A"], x["B"], x["C"], x["D"],
                            x["delta_bias"], True, torch.float32)
                    else:
                        y = vk.selective_scan_2d(**x, backend="triton")
                    backward(y, leaves)
    scan_triton._CONFIG_OVERRIDE.clear()
    # float16 too: its backward's products differ from bfloat16's (tf32 parts for dW); planes of
    # width 32 take the streaming backward, 64 the GEMM form's
    for dtype, HW in ((torch.float32, 32), (torch.bfloat16, 32), (torch.float16, 32), (torch.float16, 64)):
        for residual in (True, False):
            x = dict(x_ct=torch.randn(2, 96, HW, HW).to(dtype), x_pet=torch.randn(2, 96, HW, HW).to(dtype),
                     c_ct=torch.rand(2, 96), c_pet=torch.rand(2, 96),
                     w_ct=torch.randn(1, 192, 3, 3) * 0.05, w_pet=torch.randn(1, 192, 3, 3) * 0.05)
            leaves = [v.requires_grad_(True) for v in x.values() if isinstance(v, torch.Tensor)]
            ys = vk.cgm_gate(**x, residual=residual, backend="triton")
            backward(sum(y.float().sum() for y in ys), leaves)
    # the CGM gate's launch variants (cgm_triton.VARIANTS, which bench_cgm.py --sweep times) at the
    # stage shapes cgm1..cgm4 (Bt 1: the batch changes the grid only), bf16 and fp32
    for name, variant in cgm_triton.VARIANTS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for C, H, W in ((96, 128, 128), (192, 64, 64), (384, 32, 32), (768, 16, 16)):
                cgm_triton.CONFIG_OVERRIDE.clear()
                cgm_triton.CONFIG_OVERRIDE.update(variant)
                x = dict(x_ct=torch.randn(1, C, H, W).to(dtype), x_pet=torch.randn(1, C, H, W).to(dtype),
                         c_ct=torch.rand(1, C), c_pet=torch.rand(1, C),
                         w_ct=torch.randn(1, 2 * C, 3, 3) * 0.05, w_pet=torch.randn(1, 2 * C, 3, 3) * 0.05)
                leaves = [v.requires_grad_(True) for v in x.values() if isinstance(v, torch.Tensor)]
                ys = vk.cgm_gate(**x, residual=True, backend="triton")
                backward(sum(y.float().sum() for y in ys), leaves)
    # the fused GEMM forward's shift + apply kernel with several channel groups per pixel tile, as on
    # the GPU at cgm3 and cgm4 (the CPU's few slots give one group at most shapes here)
    for name, variant in cgm_triton.VARIANTS.items():
        gemm = variant.get("fwd", {}).get("gemm")
        if not (isinstance(gemm, dict) and gemm.get("fuse_apply")):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for C, H, W in ((96, 128, 128), (192, 64, 64), (384, 32, 32), (768, 16, 16)):
                cgm_triton.CONFIG_OVERRIDE.clear()
                cgm_triton.CONFIG_OVERRIDE["fwd"] = dict(gemm=dict(gemm, apply=dict(gemm.get("apply", {}), groups=3)))
                x = [torch.randn(1, C, H, W).to(dtype) for _ in range(2)]
                vk.cgm_gate(*x, torch.rand(1, C), torch.rand(1, C), torch.randn(1, 2 * C, 3, 3) * 0.05,
                            torch.randn(1, 2 * C, 3, 3) * 0.05, residual=True, backend="triton")
    # the GEMM-form backward variants inside the fused module (the gate's kernels with dp) at the
    # same shapes
    for name, variant in cgm_triton.VARIANTS.items():
        if not variant.get("bwd", {}).get("gemm"):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for C, H, W in ((96, 128, 128), (192, 64, 64), (384, 32, 32), (768, 16, 16)):
                cgm_triton.CONFIG_OVERRIDE.clear()
                cgm_triton.CONFIG_OVERRIDE.update(variant)
                m = CGM(C, backend="triton").train(True)
                xs = [torch.randn(2, C, H, W).to(dtype).requires_grad_() for _ in range(2)]
                assert cgm_module.supported("triton", *xs, m.channel_gate_rgb, m.channel_gate_pet) is None
                backward(sum(y.float().sum() for y in m(*xs)), xs)
    cgm_triton.CONFIG_OVERRIDE.clear()
    # the fused CGM module (cgm/module_triton.py): plane sums, channel MLPs, the gate with dp
    for dtype in (torch.float32, torch.bfloat16):
        for training in (True, False):
            C = 96 if dtype == torch.float32 else 768      # hidden 32 and 192 (cgm1, cgm4)
            m = CGM(C, backend="triton").train(training)
            xs = [torch.randn(2, C, 8, 8).to(dtype).requires_grad_() for _ in range(2)]
            assert cgm_module.supported("triton", *xs, m.channel_gate_rgb, m.channel_gate_pet) is None
            backward(sum(y.float().sum() for y in m(*xs)), xs)
    # norm-gate: one chunk (Dm 96, 192) and BD-channel chunks (768, 1536); tiles inside a plane
    # (L a multiple of the tile) and across planes (L = 1, L = 15)
    for dtype in (torch.float32, torch.bfloat16):
        for Bt, Dm, H, W in ((2, 192, 16, 16), (4, 96, 4, 4), (2, 768, 8, 8), (3, 1536, 1, 1), (2, 192, 3, 5)):
            y = torch.randn(Bt, Dm, H, W, requires_grad=True)
            z = torch.randn(Bt, H, W, 2 * Dm).to(dtype)[..., Dm:].requires_grad_(True)
            w, b = torch.ones(Dm, requires_grad=True), torch.zeros(Dm, requires_grad=True)
            out = vk.norm_gate(y, z, w, b, backend="triton")
            out.backward(torch.randn_like(out))     # a dense gradient, as in training (not .sum()'s)
    # layer_norm (norm_gate's kernels without the gate): the model's rows (C 96..768; 4 C = 384
    # in the patch merging), one chunk and BD-channel chunks, DCIM's window rows (16 C = 1536) and
    # its coarse map permuted from channels first (planes of 16 positions, EVEN); fp32 and bf16 x
    ln_cases = [((2, 16, 16, 96), False), ((2, 8, 8, 192), False), ((2, 8, 8, 384), False), ((2, 4, 4, 768), False),
                ((16, 1536), False), ((2, 4, 4, 96), True)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape, permuted in ln_cases:
            x = torch.randn(*shape).to(dtype)
            x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) if permuted else x
            x.requires_grad_(True)
            w, b = torch.ones(shape[-1], requires_grad=True), torch.zeros(shape[-1], requires_grad=True)
            out = vk.layer_norm(x, w, b, 1e-5, torch.bfloat16, backend="triton")
            out.backward(torch.randn_like(out))     # a dense gradient, as in training
    # dwconv + SiLU: a plane the tiles divide (EVEN), 4 x 4 windows (tiles across planes), W = 128,
    # no bias, fp16, the largest kernel; x a chunk of in_proj's output as in SS2D
    from vmambax_kernels.dwconv import triton as dwconv_triton
    dwconv_triton.interpreting = lambda: False
    dw_cases = [(dt, shape, 3, True) for dt in (torch.float32, torch.bfloat16)
                for shape in ((2, 16, 16, 192), (8, 4, 4, 96))]
    dw_cases += [(torch.bfloat16, (1, 4, 128, 32), 3, True), (torch.bfloat16, (2, 8, 8, 64), 3, False),
                 (torch.float16, (2, 8, 8, 64), 3, True), (torch.bfloat16, (1, 8, 8, 16), 7, True)]
    for dtype, (Bt, H, W, Dm), K, has_bias in dw_cases:
        x = torch.randn(Bt, H, W, 2 * Dm).to(dtype)[..., :Dm].requires_grad_(True)
        w = (torch.randn(Dm, 1, K, K) / K).requires_grad_(True)
        b = torch.zeros(Dm, requires_grad=True) if has_bias else None
        out = vk.dwconv_silu(x, w, b, backend="triton")
        out.backward(torch.randn_like(out))         # a dense gradient, as in training
    return launches


def sass_digest(cuobjdump: str, cubin: str) -> str:
    """A digest of the cubin's SASS instructions alone (no source lines, no addresses in comments):
    equal digests before and after a refactor mean the GPU runs the same machine code."""
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    ins = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", out)]
    return hashlib.sha1("\n".join(ins).encode()).hexdigest()[:12]


def compile_all(launches: list[dict], arch: int, digest: bool = False) -> int:
    """Parent process (no interpreter): triton.compile each launch; returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__),
                             "bin", "cuobjdump")
    failures = 0
    for rec in launches:
        module = importlib.import_module(rec["module"])
        if hasattr(module, "_kernels"):   # modules that jit their kernels on first use (cgm)
            module._kernels()
        fn = getattr(module, rec["name"])
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            value = rec["values"].get(name)
            if fn.params[i].is_constexpr or name in rec["constexprs"]:
                signature[name] = "constexpr"
                value = rec["constexprs"].get(name, value)
                constexprs[name] = False if name == "INTERP" else value
            elif rec["args"].get(name) is None:        # None passed for an optional pointer
                signature[name], constexprs[name] = "constexpr", None
            elif rec["args"][name] == "i32" and value == 1 and not isinstance(value, bool) \
                    and not fn.params[i].do_not_specialize:
                # Triton's launcher specialises as it does: an int equal to 1 becomes a constant
                # (a unit stride: what lets its coalescing pass see contiguous rows) ...
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = rec["args"][name]
                # ... and ints that are multiples of 16 and 16-byte aligned pointers carry the hint;
                # neither for arguments in do_not_specialize (the scan's `one`, Dm, TC: the launcher
                # leaves them alone, and `one` exists to keep the compiler from vectorising)
                int16 = isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
                if (int16 and not fn.params[i].do_not_specialize) \
                        or (rec.get("aligned", {}).get(name) and not fn.params[i].do_not_specialize_on_alignment):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        opts = {k: v for k, v in rec["meta"].items() if k in ("num_warps", "num_stages", "maxnreg")}
        dtype = next((t[1:] for t in rec["args"].values() if t and t.startswith("*")), "")
        label = f"{rec['name']} {dtype} " + " ".join(f"{k}={v}" for k, v in sorted(rec["constexprs"].items())
                                                      if k != "INTERP") \
            + "".join(f" {k}={v}" for k, v in sorted(opts.items()))
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts)
        except Exception as exc:  # report every launch, not only the first failure
            failures += 1
            print(f"FAIL {label}\n     {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        usage = ""
        if not os.path.exists(cuobjdump):
            print(f"ok   {label}")
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out.stdout)
            if m:
                usage = f"regs {m.group(1)} stack {m.group(2)} B shared {m.group(3)} B"
            if digest:
                usage += f" sass {sass_digest(cuobjdump, f.name)}"
        print(f"ok   {label}  [{usage}]")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100)")
    ap.add_argument("--only", default="", help="compile only the launches whose kernel name contains one of "
                                                "these comma-separated strings")
    ap.add_argument("--digest", action="store_true", help="print a digest of each launch's SASS (compare "
                    "two runs: a refactor with every digest unchanged needs no new GPU run)")
    ap.add_argument("--record", action="store_true", help=argparse.SUPPRESS)   # the child's role
    args = ap.parse_args()
    if args.record:
        print(json.dumps(record(), default=str))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_offline.py: unset TRITON_INTERPRET (the compile step needs Triton's compiler)")
        return 2
    child = subprocess.run([sys.executable, __file__, "--record"], capture_output=True, text=True, cwd=ROOT)
    if child.returncode != 0:
        print(child.stderr[-3000:])
        return 2
    launches = [r for r in json.loads(child.stdout.strip().splitlines()[-1])
                if any(o in r["name"] for o in args.only.split(","))]
    print(f"{len(launches)} distinct launches recorded; compiling for sm_{args.arch}")
    failures = compile_all(launches, args.arch, args.digest)
    print(f"{len(launches) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
