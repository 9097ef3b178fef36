"""Norm-gate benchmark (issue 7): SS2D's LayerNorm + SiLU gate, fused kernel vs the PyTorch ops.

    python benchmarks/bench_norm_gate.py [--cases enc1,enc4] [--dtypes bf16] [--sweep] [--no-record]

Op scope: y (Bt, Dm, H, W) fp32 channels first as the scan returns it, z a chunk of in_proj's
output ((Bt, H, W, Dm) with row stride 2 Dm) in the activation dtype; out (Bt, H, W, Dm) in that
dtype. Providers: "triton" (vmambax_kernels.norm_gate, one kernel each way) and "torch" (SS2D's
code under autocast: permute, out_norm in fp32, cast, silu, multiply). fwd under no_grad; fwdbwd
with a fixed random output gradient, gradients for y, z, weight and bias; peak_mb = extra memory of
fwdbwd. floor_ms: the bytes a fused fwd+bwd must move (fwd: read y, z, write out; bwd: read y, z,
g, write dy, dz) at the copy bandwidth measured in the same run; the kernels' own times and their
share of that bandwidth are printed too. --sweep times a few launch configurations at the first
case and benchmarks with the fastest (results checked against the reference).

Not yet run on a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.norm_gate import reference, triton as ng_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (Bt, Dm, H, W): the encoder runs on [ct; pet] (Bt = 2 x batch 8); DESIGN.md's dcim_inner1 windows
CASES = {"enc1": (16, 192, 128, 128), "enc2": (16, 384, 64, 64), "enc3": (16, 768, 32, 32),
         "enc4": (16, 1536, 16, 16), "dcim_inner1": (8192, 192, 4, 4)}
EPS = 1e-5
DEVICE = "cuda"
# Launch configurations tried by --sweep (keys of vmambax_kernels.norm_gate.triton._DEFAULTS)
SWEEP = {"fwd": [dict(), dict(tile=2048), dict(per_thread=8), dict(BD=64), dict(max_one=128)],
         "bwd": [dict(), dict(tile=2048), dict(tile=2048, per_thread=16), dict(per_thread=4),
                 dict(max_one=256, tile=4096), dict(warps_per_sm=32), dict(BD=128, tile=2048)]}


def _inputs(case, dtype, seed=0):
    """y, z (a strided leaf like SS2D's chunk), weight, bias, and an output gradient."""
    Bt, Dm, H, W = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    y = torch.randn(Bt, Dm, H, W, device=DEVICE, generator=g) * 2 + 0.5
    z = torch.randn(Bt, H, W, 2 * Dm, device=DEVICE, generator=g).to(dtype)[..., Dm:]
    weight = 1 + 0.1 * torch.randn(Dm, device=DEVICE, generator=g)
    bias = 0.1 * torch.randn(Dm, device=DEVICE, generator=g)
    grad = torch.randn(Bt, H, W, Dm, device=DEVICE, generator=g).to(dtype)
    return (y, z, weight, bias), grad


def torch_gate(y, z, weight, bias):
    """SS2D's PyTorch ops as they run under autocast (out_norm in fp32, rounded to z's dtype, then
    the gate): the reference."""
    return reference.norm_gate(y, z, weight, bias, EPS)


def fused_gate(y, z, weight, bias):
    return vk.norm_gate(y, z, weight, bias, EPS, backend="triton")


def sweep(case, dtype_name) -> dict:
    """The fastest SWEEP configuration of each kernel whose results match the reference."""
    (y, z, w, b), grad = _inputs(case, DTYPES[dtype_name])
    print(f"== sweep at {case} {dtype_name}")
    return harness.sweep_fwd_bwd(
        ng_triton.CONFIG_OVERRIDE, SWEEP, lambda *t: vk.norm_gate(*t, EPS, backend="reference"),
        (y, z, w, b), grad, lambda: ng_triton._forward(y, z, w, b, EPS),
        lambda mean, rstd: ng_triton._backward(grad, y, z, w, b, mean, rstd))


def bench_case(case, dtype_name, copy_tbps, env):
    dtype = DTYPES[dtype_name]
    Bt, Dm, H, W = CASES[case]
    n, e = Bt * Dm * H * W, torch.finfo(dtype).bits // 8
    tensors, grad = _inputs(case, dtype)
    fwd_bytes, bwd_bytes = n * (4 + 2 * e), n * (8 + 3 * e)
    floor = (fwd_bytes + bwd_bytes) / (copy_tbps * 1e12) * 1e3
    with torch.no_grad():
        diff = (fused_gate(*tensors).float() - torch_gate(*tensors).float()).abs().max().item()
    rows = []
    for provider, fn in (("triton", fused_gate), ("torch", torch_gate)):
        with torch.no_grad():
            fwd = harness.time_ms(lambda: fn(*tensors))
        fwdbwd = harness.time_ms(harness.fwdbwd(fn, tensors, grad))
        extra = {}
        if provider == "triton":
            out, mean, rstd = ng_triton._forward(*tensors, EPS)
            kf = harness.time_ms(lambda: ng_triton._forward(*tensors, EPS))
            kb = harness.time_ms(lambda: ng_triton._backward(grad, *tensors, mean, rstd))
            extra = harness.kernel_figures(kf, kb, fwd_bytes, bwd_bytes, copy_tbps, ng_triton.CONFIG_OVERRIDE)
        rows.append(harness.record("norm_gate", case, provider, dtype_name, Bt, env, fwd_ms=fwd,
                                   fwdbwd_ms=fwdbwd, peak_mb=harness.peak_mb(harness.fwdbwd(fn, tensors, grad)),
                                   floor_ms=floor, max_abs_diff_vs_torch=diff, **extra))
    return rows


def main(argv=None):
    harness.kernel_bench_main(
        argv, script="bench_norm_gate.py", doc=__doc__, op="norm_gate", cases=CASES, dtypes=DTYPES,
        default_cases="enc1,enc4,dcim_inner1", default_dtypes="bf16", bench_case=bench_case, sweep=sweep,
        configs=SWEEP, table_row=harness.bandwidth_row,
        title="norm-gate fwd/fwdbwd (ms), kernels alone (ms, % of the measured copy bandwidth "
              "{copy_tbps:.2f} TB/s), {gpu}")


if __name__ == "__main__":
    main()
