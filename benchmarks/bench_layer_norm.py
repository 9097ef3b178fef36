"""layer_norm benchmark: the model's LayerNorms under autocast, PyTorch's (fp32 LayerNorm + the
consumer's cast) vs the Triton op that writes the autocast dtype itself.

    python benchmarks/bench_layer_norm.py [--cases enc1,enc4] [--dtypes bf16] [--sweep] [--no-record]

Op scope: x (Bt, H, W, C) fp32 channels last as the encoder's residual stream gives it (batch 8),
weight and bias fp32; out in the autocast dtype. Providers: "torch" (under torch.autocast:
F.layer_norm, which autocast runs in fp32 and returns in fp32, then ``.to(dtype)``, the cast that
the consumer's Linear or conv does) and "triton" (``vmambax_kernels.layer_norm(..., out_dtype)``,
what ``vmambax_kernels.modules.LayerNorm`` runs under CUDA autocast). fwd under no_grad; fwdbwd with
a fixed random output gradient in the autocast dtype, gradients for x, weight and bias; peak_mb =
extra memory of fwdbwd. floor_ms: the bytes a fused fwd+bwd must move (fwd: read x, write out; bwd:
read x and g, write dx) at the copy bandwidth measured in the same run; the kernels' own times and
their share of that bandwidth are printed too. Also "window1" (DCIM's 4x4 windows at stage 1: rows
of 16 x 96 channels, bf16 as the stem's convs give them) and "outer1" (DCIM's coarse map at stage 1:
a bf16 channels-first conv output permuted to channels last). --sweep times a few launch
configurations of the kernels (shared with norm_gate: norm_gate/triton.py) at the first case.

Not yet run on a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.layer_norm import triton as ln_triton  # noqa: E402
from vmambax_kernels.norm_gate import triton as ng_triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# name: (shape of x, x dtype ("out": the autocast dtype), layout)
CASES = {"enc1": ((8, 128, 128, 96), "fp32", "rows"), "enc2": ((8, 64, 64, 192), "fp32", "rows"),
         "enc3": ((8, 32, 32, 384), "fp32", "rows"), "enc4": ((8, 16, 16, 768), "fp32", "rows"),
         "window1": ((8 * 32 * 32, 16 * 96), "out", "rows"), "outer1": ((8, 32, 32, 96), "out", "permuted")}
EPS = 1e-5
DEVICE = "cuda"
SWEEP = {"fwd": [dict(), dict(tile=2048), dict(per_thread=8), dict(per_thread=32), dict(max_one=128)],
         "bwd": [dict(), dict(tile=2048), dict(per_thread=16), dict(per_thread=4), dict(max_one=256, tile=4096)]}


def _inputs(case, dtype, seed=0):
    """x (fp32, or the autocast dtype; permuted from channels first for "outer1"), weight, bias,
    and an output gradient in the autocast dtype."""
    shape, x_dtype, layout = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.randn(shape, device=DEVICE, generator=g) * 2 + 0.5).to(dtype if x_dtype == "out" else torch.float32)
    if layout == "permuted":
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    C = shape[-1]
    weight = 1 + 0.1 * torch.randn(C, device=DEVICE, generator=g)
    bias = 0.1 * torch.randn(C, device=DEVICE, generator=g)
    grad = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    return (x, weight, bias), grad


def torch_ln(dtype):
    def run(x, weight, bias):
        with torch.autocast("cuda", dtype=dtype):
            return F.layer_norm(x, x.shape[-1:], weight, bias, EPS).to(dtype)
    return run


def triton_ln(dtype):
    return lambda x, weight, bias: vk.layer_norm(x, weight, bias, EPS, dtype, backend="triton")


def sweep(case, dtype_name) -> dict:
    """The fastest SWEEP configuration of each kernel whose results match the reference."""
    dtype = DTYPES[dtype_name]
    (x, w, b), grad = _inputs(case, dtype)
    print(f"== sweep at {case} {dtype_name}")
    return harness.sweep_fwd_bwd(
        ng_triton.CONFIG_OVERRIDE, SWEEP, lambda *t: vk.layer_norm(*t, EPS, torch.float32, backend="reference"),
        (x, w, b), grad, lambda: ln_triton._forward(x, w, b, EPS, dtype),
        lambda mean, rstd: ln_triton._backward(grad, x, w, mean, rstd))


def bench_case(case, dtype_name, copy_tbps, env):
    dtype = DTYPES[dtype_name]
    tensors, grad = _inputs(case, dtype)
    x = tensors[0]
    n, ex, eo = x.numel(), x.element_size(), grad.element_size()
    fwd_bytes, bwd_bytes = n * (ex + eo), n * (2 * ex + eo)
    floor = (fwd_bytes + bwd_bytes) / (copy_tbps * 1e12) * 1e3
    with torch.no_grad():
        diff = (triton_ln(dtype)(*tensors).float() - torch_ln(dtype)(*tensors).float()).abs().max().item()
    rows = []
    for provider, fn in (("triton", triton_ln(dtype)), ("torch", torch_ln(dtype))):
        with torch.no_grad():
            fwd = harness.time_ms(lambda: fn(*tensors))
        fwdbwd = harness.time_ms(harness.fwdbwd(fn, tensors, grad))
        extra = {}
        if provider == "triton":
            out, mean, rstd = ln_triton._forward(*tensors, EPS, dtype)
            kf = harness.time_ms(lambda: ln_triton._forward(*tensors, EPS, dtype))
            kb = harness.time_ms(lambda: ln_triton._backward(grad, x, tensors[1], mean, rstd))
            extra = harness.kernel_figures(kf, kb, fwd_bytes, bwd_bytes, copy_tbps, ng_triton.CONFIG_OVERRIDE)
        rows.append(harness.record("layer_norm", case, provider, dtype_name, x.shape[0], env, fwd_ms=fwd,
                                   fwdbwd_ms=fwdbwd, peak_mb=harness.peak_mb(harness.fwdbwd(fn, tensors, grad)),
                                   floor_ms=floor, max_abs_diff_vs_torch=diff, x_dtype=str(x.dtype)[6:],
                                   shape=list(x.shape), **extra))
    return rows


def main(argv=None):
    harness.kernel_bench_main(
        argv, script="bench_layer_norm.py", doc=__doc__, op="layer_norm", cases=CASES, dtypes=DTYPES,
        default_cases="enc1,enc2,enc3,enc4,window1,outer1", default_dtypes="bf16", bench_case=bench_case,
        sweep=sweep, configs=SWEEP, table_row=harness.bandwidth_row,
        title="layer_norm fwd/fwdbwd (ms), kernels alone (ms, % of the measured copy bandwidth "
              "{copy_tbps:.2f} TB/s), {gpu}")


if __name__ == "__main__":
    main()
