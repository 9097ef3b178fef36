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

import argparse
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


def _fwdbwd(fn, tensors, grad):
    def run():
        leaves = [t.detach().requires_grad_() for t in tensors]   # detach keeps z's strides
        out = fn(*leaves)
        out.backward(grad)
        return out
    return run


def sweep(case, dtype_name) -> dict:
    """The fastest SWEEP configuration of each kernel whose results match the reference."""
    (y, z, w, b), grad = _inputs(case, DTYPES[dtype_name])
    leaves = [t.detach().float().requires_grad_() for t in (y, z, w, b)]
    ref = vk.norm_gate(*leaves, EPS, backend="reference")
    ref.backward(grad.float())
    ref_g = [t.grad for t in leaves]

    def trial(kind):
        out, mean, rstd = ng_triton._forward(y, z, w, b, EPS)
        if kind == "fwd":
            return harness.rel_error((out,), (ref,)), lambda: ng_triton._forward(y, z, w, b, EPS)
        return (harness.rel_error(ng_triton._backward(grad, y, z, w, b, mean, rstd), ref_g),
                lambda: ng_triton._backward(grad, y, z, w, b, mean, rstd))
    print(f"== sweep at {case} {dtype_name}")
    return harness.sweep_configs(ng_triton.CONFIG_OVERRIDE, SWEEP, trial)


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
        fwdbwd = harness.time_ms(_fwdbwd(fn, tensors, grad))
        extra = {}
        if provider == "triton":
            out, mean, rstd = ng_triton._forward(*tensors, EPS)
            kf = harness.time_ms(lambda: ng_triton._forward(*tensors, EPS))
            kb = harness.time_ms(lambda: ng_triton._backward(grad, *tensors, mean, rstd))
            extra = dict(kernel_fwd_ms=kf, kernel_bwd_ms=kb,
                         kernel_fwd_tbps=fwd_bytes / (kf * 1e-3) / 1e12,
                         kernel_bwd_tbps=bwd_bytes / (kb * 1e-3) / 1e12,
                         copy_tbps=copy_tbps, config=dict(ng_triton.CONFIG_OVERRIDE) or "default")
        rows.append(harness.record("norm_gate", case, provider, dtype_name, Bt, env, fwd_ms=fwd,
                                   fwdbwd_ms=fwdbwd, peak_mb=harness.peak_mb(_fwdbwd(fn, tensors, grad)),
                                   floor_ms=floor, max_abs_diff_vs_torch=diff, **extra))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="enc1,enc4,dcim_inner1")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_norm_gate.py: needs a CUDA GPU")
    why = vk.available_backends("norm_gate")["triton"]
    if not why.available:
        sys.exit(f"bench_norm_gate.py: the triton backend cannot run: {why.reason}")
    cases, dtypes = args.cases.split(","), args.dtypes.split(",")
    bad = [c for c in cases if c not in CASES] + [d for d in dtypes if d not in DTYPES]
    if bad:
        sys.exit(f"bench_norm_gate.py: unknown cases/dtypes {bad}; cases: {list(CASES)}, dtypes: {list(DTYPES)}")
    env = harness.env_info()
    copy_tbps = harness.copy_tbps()
    print(f"== {env['gpu']}: copy bandwidth {copy_tbps:.2f} TB/s")
    if args.sweep:
        sweep(cases[0], dtypes[0])
    records = []
    for dtype in dtypes:
        for case in cases:
            records += bench_case(case, dtype, copy_tbps, env)
    table = []
    for r in records:
        if r["provider"] != "triton":
            continue
        peer = next(p for p in records if p["provider"] == "torch" and p["case"] == r["case"]
                    and p["dtype"] == r["dtype"])
        table.append(dict(case=r["case"], dtype=r["dtype"], fwd=r["fwd_ms"], torch_fwd=peer["fwd_ms"],
                          fwd_speedup=harness.ratio(r["fwd_ms"], peer["fwd_ms"]),
                          fwdbwd=r["fwdbwd_ms"], torch_fwdbwd=peer["fwdbwd_ms"],
                          speedup=harness.ratio(r["fwdbwd_ms"], peer["fwdbwd_ms"]),
                          floor=r["floor_ms"], vs_floor=harness.ratio(r["floor_ms"], r["fwdbwd_ms"]),
                          k_fwd=r["kernel_fwd_ms"], k_bwd=r["kernel_bwd_ms"],
                          bw_fwd=f"{100 * r['kernel_fwd_tbps'] / copy_tbps:.0f}%",
                          bw_bwd=f"{100 * r['kernel_bwd_tbps'] / copy_tbps:.0f}%",
                          mb=r["peak_mb"], torch_mb=peer["peak_mb"], diff=r["max_abs_diff_vs_torch"]))
    cols = [(k, k) for k in table[0]] if table else []
    harness.print_table(table, cols, title=f"norm-gate fwd/fwdbwd (ms), kernels alone (ms, % of the "
                                           f"measured copy bandwidth {copy_tbps:.2f} TB/s), {env['gpu']}")
    if not args.no_record:
        print("== records appended to", harness.append_records(records))


if __name__ == "__main__":
    main()
