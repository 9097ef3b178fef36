"""SS2D input-glue benchmark: fused dwconv + SiLU (Triton) vs today's PyTorch composition.

    python benchmarks/bench_dwconv.py [--cases enc1,dcim_inner1,enc4] [--dtypes bf16] [--sweep] [--no-record]

"torch": what SS2D runs today under autocast: ``permute(0, 3, 1, 2).contiguous()`` of in_proj's
chunk, conv2d (depthwise, cuDNN) with the weight and bias cast to the activation dtype, SiLU.
"triton": ``vmambax_kernels.dwconv_silu`` on the chunk with the fp32 parameters. x is always the
first half of a (Bt, H, W, 2 Dm) tensor, as in_proj gives it. fwd under no_grad; fwdbwd with a
fixed random output gradient, gradients for x, weight and bias. Kernel scope: the fused forward
and backward launches alone, with their floor (bytes they must move: fwd reads x and writes out,
bwd reads x and dy and writes dx) at the copy bandwidth measured in the same run. --sweep times
the backward (and forward) kernels under a few launch configurations first and keeps the fastest.

    VMAMBAX_SKIP_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e . && \\
    python -m pytest -q -m gpu tests/ops/test_dwconv.py && python benchmarks/bench_dwconv.py --sweep
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.dwconv import triton as dw_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (Bt, H, W, Dm): the 512x512 model at batch 8 (Dm = 2 d_model)
CASES = {"enc1": (8, 128, 128, 192), "dcim_inner1": (8192, 4, 4, 192), "enc4": (8, 16, 16, 1536)}
SWEEP = {"fwd": [dict(), dict(BP=64), dict(BP=256), dict(BC=16, BP=256), dict(num_warps=4)],
         "bwd_dz": [dict(), dict(BP=128), dict(BP=32), dict(BC=16, BP=128), dict(num_warps=4)],
         "bwd_dx": [dict(), dict(BP=128), dict(BP=32), dict(BC=16, BP=128), dict(num_warps=4)]}
DEVICE = "cuda"


def make(case, dtype, seed=0):
    Bt, H, W, Dm = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    xf = torch.randn(Bt, H, W, 2 * Dm, device=DEVICE, generator=g).to(dtype)
    w = (torch.rand(Dm, 1, 3, 3, device=DEVICE, generator=g) * 2 - 1) / 3
    b = (torch.rand(Dm, device=DEVICE, generator=g) * 2 - 1) / 3
    dy = torch.randn(Bt, Dm, H, W, device=DEVICE, generator=g).to(dtype)
    return xf, w, b, dy


def torch_glue(x, w, b):
    xs = x.permute(0, 3, 1, 2).contiguous()                                   # (Bt, Dm, H, W)
    return F.silu(F.conv2d(xs, w.to(x.dtype), b.to(x.dtype), padding=1, groups=x.shape[-1]))


def fused_glue(x, w, b):
    return vk.dwconv_silu(x, w, b, backend="triton")


def _fwdbwd(fn, xf, w, b, dy):
    Dm = w.shape[0]

    def run():
        leaves = [xf.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()]
        y = fn(leaves[0][..., :Dm], leaves[1], leaves[2])
        y.backward(dy)
        return y
    return run


def kernel_times(case, dtype):
    xf, w, b, dy = make(case, dtype)
    x = xf[..., :w.shape[0]]
    fwd = harness.time_ms(lambda: dw_triton._forward(x, w, b))
    bwd = harness.time_ms(lambda: dw_triton._backward(dy, x, w, b))
    return fwd, bwd


def sweep(case, dtype_name) -> dict:
    """The fastest SWEEP configuration of each kernel at ``case`` whose results match the default's."""
    print(f"== sweep at {case} {dtype_name}")
    xf, w, b, dy = make(case, DTYPES[dtype_name])
    x = xf[..., :w.shape[0]]
    dw_triton.CONFIG_OVERRIDE.clear()
    ref_y, ref_g = dw_triton._forward(x, w, b), dw_triton._backward(dy, x, w, b)

    def trial(kind):
        if kind == "fwd":
            return harness.rel_error((dw_triton._forward(x, w, b),), (ref_y,)), lambda: dw_triton._forward(x, w, b)
        return harness.rel_error(dw_triton._backward(dy, x, w, b), ref_g), lambda: dw_triton._backward(dy, x, w, b)
    return harness.sweep_configs(dw_triton.CONFIG_OVERRIDE, SWEEP, trial)


def bench_case(case, dtype_name, copy_tbps, env):
    dtype = DTYPES[dtype_name]
    Bt, H, W, Dm = CASES[case]
    xf, w, b, dy = make(case, dtype)
    x = xf[..., :Dm]
    n, e = Bt * H * W * Dm, torch.finfo(dtype).bits // 8
    fwd_floor = 2 * n * e / (copy_tbps * 1e12) * 1e3
    bwd_floor = 3 * n * e / (copy_tbps * 1e12) * 1e3
    rows = []
    ref = torch_glue(x.float(), w, b)
    for provider, fn in (("torch", torch_glue), ("triton", fused_glue)):
        with torch.no_grad():
            fwd = harness.time_ms(lambda: fn(x, w, b))
            err = (fn(x, w, b).float() - ref).abs().max().item()
        fwdbwd = harness.time_ms(_fwdbwd(fn, xf, w, b, dy))
        peak = harness.peak_mb(_fwdbwd(fn, xf, w, b, dy))
        extra = {}
        if provider == "triton":
            kf, kb = kernel_times(case, dtype)
            extra = dict(kernel_fwd_ms=kf, kernel_bwd_ms=kb, kernel_fwd_floor_ms=fwd_floor,
                         kernel_bwd_floor_ms=bwd_floor, copy_tbps=copy_tbps,
                         config=dict(dw_triton.CONFIG_OVERRIDE) or "default")
        rows.append(harness.record("dwconv", case, provider, dtype_name, Bt, env, fwd_ms=fwd,
                                   fwdbwd_ms=fwdbwd, peak_mb=peak, floor_ms=fwd_floor + bwd_floor,
                                   max_abs_diff_vs_fp32=err, **extra))
    return rows


def table_row(r, records, copy_tbps):
    p = harness.peer(records, r)
    return dict(harness.speedup_cells(r, p),
                k_fwd=r["kernel_fwd_ms"], fwd_vs_floor=harness.ratio(r["kernel_fwd_floor_ms"], r["kernel_fwd_ms"]),
                k_bwd=r["kernel_bwd_ms"], bwd_vs_floor=harness.ratio(r["kernel_bwd_floor_ms"], r["kernel_bwd_ms"]),
                mb=r["peak_mb"], torch_mb=p["peak_mb"],
                diff=r["max_abs_diff_vs_fp32"], torch_diff=p["max_abs_diff_vs_fp32"])


def main(argv=None):
    harness.kernel_bench_main(
        argv, script="bench_dwconv.py", doc=__doc__, op="dwconv_silu", cases=CASES, dtypes=DTYPES,
        default_cases=",".join(CASES), default_dtypes="bf16", bench_case=bench_case,
        sweep=sweep, configs=SWEEP, table_row=table_row,
        title="dwconv + SiLU fwd/fwdbwd (ms; *_vs_floor: kernel time over its floor at {copy_tbps:.2f} TB/s), {gpu}")


if __name__ == "__main__":
    main()
