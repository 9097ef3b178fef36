"""up2_bilinear benchmark: the decoder's bilinear x2 upsampling (channels last), PyTorch's
(forward and scattering backward) vs the Triton backend (the same forward, a gathering backward).

    python benchmarks/bench_up2.py [--cases expand3,final_b] [--dtypes bf16] [--sweep] [--no-record]

Op scope: x (Bt, H, W, C) in the autocast dtype as the decoder's Linear gives it (batch 8), out
(Bt, 2H, 2W, C). Providers: "torch" (``up2_bilinear(backend="reference")``: F.interpolate of the
channels-first view, the decoder's code before) and "triton". fwd under no_grad; fwdbwd with a fixed
random output gradient; peak_mb = extra memory of fwdbwd. floor_ms: the bytes a fwd+bwd must move
(fwd: read x, write 4x its size; bwd: read that gradient, write dx) at the copy bandwidth of the same
run. The kernels alone: the forward is PyTorch's in both providers, the backward the gather kernel.
--sweep times tile lengths of the backward at the first case. H200, bf16 (eccf39e): fwd+bwd 2.10x
PyTorch's at final_b, 0.5-0.9x at the small expand cases (the autograd Function's host time).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.upsample import reference as up_reference  # noqa: E402
from vmambax_kernels.upsample import triton as up_triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the decoder's upsamplings at 512x512, batch 8: PatchExpand of stages 1-3, the final x4's two steps
CASES = {"expand1": (8, 16, 16, 384), "expand2": (8, 32, 32, 192), "expand3": (8, 64, 64, 96),
         "final_a": (8, 128, 128, 96), "final_b": (8, 256, 256, 96)}
DEVICE = "cuda"
SWEEP = {"bwd": [dict(BP=16), dict(BP=32), dict(BP=64), dict(BP=128)]}
DEFAULT_BP = up_triton.BP   # records name a tile only when it is not this one (report.py's rows)


def _inputs(case, dtype, seed=0):
    Bt, H, W, C = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn((Bt, H, W, C), device=DEVICE, generator=g).to(dtype)
    grad = torch.randn((Bt, 2 * H, 2 * W, C), device=DEVICE, generator=g).to(dtype)
    return (x,), grad


def op(backend):
    return lambda x: vk.up2_bilinear(x, backend=backend)


def sweep(case, dtype_name) -> dict:
    """The backward kernel's time at each tile length of SWEEP (the results checked against the
    default's, bit for bit: the tile changes no sum); returns the fastest."""
    (x,), grad = _inputs(case, DTYPES[dtype_name])
    H, W = x.shape[1:3]
    default = up_triton._backward(grad, H, W)
    print(f"== sweep at {case} {dtype_name}")
    best, best_ms = {}, None
    old = up_triton.BP
    try:
        for cfg in SWEEP["bwd"]:
            up_triton.BP = cfg["BP"]
            if not torch.equal(up_triton._backward(grad, H, W), default):
                print(f"  {cfg}: results differ from the default's; skipped")
                continue
            ms = harness.time_ms(lambda: up_triton._backward(grad, H, W))
            print(f"  {cfg}: {ms:.4f} ms")
            if best_ms is None or ms < best_ms:
                best, best_ms = cfg, ms
    finally:
        up_triton.BP = old
    return {"bwd": best}


def bench_case(case, dtype_name, copy_tbps, env):
    dtype = DTYPES[dtype_name]
    tensors, grad = _inputs(case, dtype)
    x = tensors[0]
    n, e = x.numel(), x.element_size()
    fwd_bytes = bwd_bytes = 5 * n * e
    floor = (fwd_bytes + bwd_bytes) / (copy_tbps * 1e12) * 1e3
    with torch.no_grad():
        diff = (op("triton")(x).float() - op("reference")(x).float()).abs().max().item()
    H, W = x.shape[1:3]
    rows = []
    for provider, fn in (("triton", op("triton")), ("torch", op("reference"))):
        with torch.no_grad():
            fwd = harness.time_ms(lambda: fn(*tensors))
        fwdbwd = harness.time_ms(harness.fwdbwd(fn, tensors, grad))
        extra = {}
        if provider == "triton":
            with torch.no_grad():
                kf = harness.time_ms(lambda: up_reference.up2_bilinear(x))
            kb = harness.time_ms(lambda: up_triton._backward(grad, H, W))
            extra = harness.kernel_figures(kf, kb, fwd_bytes, bwd_bytes, copy_tbps, {"BP": up_triton.BP} if up_triton.BP != DEFAULT_BP else {})
        rows.append(harness.record("up2", case, provider, dtype_name, x.shape[0], env, fwd_ms=fwd,
                                   fwdbwd_ms=fwdbwd, peak_mb=harness.peak_mb(harness.fwdbwd(fn, tensors, grad)),
                                   floor_ms=floor, max_abs_diff_vs_torch=diff, shape=list(x.shape), **extra))
    return rows


def main(argv=None):
    harness.kernel_bench_main(
        argv, script="bench_up2.py", doc=__doc__, op="up2_bilinear", cases=CASES, dtypes=DTYPES,
        default_cases="expand1,expand2,expand3,final_a,final_b", default_dtypes="bf16", bench_case=bench_case,
        sweep=sweep, configs=SWEEP, table_row=harness.bandwidth_row,
        title="up2_bilinear fwd/fwdbwd (ms), kernels alone (ms, % of the measured copy bandwidth "
              "{copy_tbps:.2f} TB/s; the forward is PyTorch's), {gpu}")


if __name__ == "__main__":
    main()
