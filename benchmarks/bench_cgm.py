"""CGM benchmark (DESIGN.md: bench "cgm", cases cgm1..cgm4; issue 5's targets).

    python benchmarks/bench_cgm.py [--cases cgm1,cgm4] [--dtypes bf16,fp16] [--sweep | --sweep-all] [--no-record]
    python benchmarks/bench_cgm.py --sweep-all --cases cgm1 --dtypes bf16 \
        --configs '{"bwd": [{"num_stages": 1, "evict": true, "bcz": 32}, {"num_stages": 1, "evict": true, "bcz": 32, "max_tw": 64}]}'

Module scope: forward + backward of a whole CGM (GAP, channel MLP, both spatial gates, gating)
mirroring SPEC.md section 2, with the gate in the Triton kernels ("triton"), or as the plain
PyTorch module computes it under autocast ("torch": conv2d in the activation dtype), or the model's
own module (vmambax.models.fusion.CGM, same weights) on its fused path ("triton_module": GAP, both
channel MLPs with BatchNorm in train mode over blocks, and the gate's kernels, as one autograd node;
vmambax_kernels/cgm/module_triton.py). fwd under no_grad; fwdbwd with a fixed random gradient for
both outputs, gradients for x and every parameter; fwdbwd_graph_ms the same step replayed from a
CUDA graph (device time without the host's per-op overhead); peak_mb = extra memory of fwdbwd.
floor_ms counts the bytes a fused module must move for fwdbwd (GAP read, gate read + write,
backward read x and dy, write dx) at DESIGN.md's measured 3.0 TB/s. Kernel scope: the forward and
backward kernels alone, replayed from CUDA graphs, their achieved bandwidth on the bytes they must
move (fwd: read both x, write both y; bwd: read both x and dy, write both dx), next to the copy
bandwidth measured in the same run. --sweep times the kernels under a few launch configurations at
the first case and benchmarks with the fastest; --sweep-all sweeps every case
and dtype and stops (the per-case data a default is chosen by).

One GPU session (install, GPU tests with evidence, this benchmark), as run for the records:
    VMAMBAX_SKIP_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e . && \
    bash benchmarks/device_run.sh --no-build \
         --tests "-m gpu tests/ops/test_cgm_triton.py tests/ops/test_cgm_module_triton.py" \
         --bench "benchmarks/bench_cgm.py --sweep"
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.cgm import triton as cgm_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = {"cgm1": (8, 96, 128, 128), "cgm2": (8, 192, 64, 64), "cgm3": (8, 384, 32, 32), "cgm4": (8, 768, 16, 16)}
COPY_TBPS = 3.0  # DESIGN.md: measured H100 copy bandwidth
DEVICE = "cuda"
# Launch configurations tried by --sweep (keys of vmambax_kernels.cgm.triton._DEFAULTS; strip rows
# follow from programs_per_sm for each case, so a choice made at cgm1 carries to the others)
SWEEP = {"fwd": [dict(), dict(BC=32, num_warps=8), dict(programs_per_sm=1), dict(programs_per_sm=4)],
         "bwd": [dict(), dict(BC=32), dict(programs_per_sm=1), dict(programs_per_sm=4), dict(num_stages=1),
                 # the dz pass's channel block and L2 eviction hints (cgm_triton._config)
                 dict(num_stages=1, evict=True, bcz=32), dict(evict=True, bcz=64)]}
# ... and the variants prepared for timing (cgm_triton.VARIANTS: what each is for, its registers)
for _variant in cgm_triton.VARIANTS.values():
    for _kind, _cfg in _variant.items():
        SWEEP[_kind].append(dict(_cfg))


class CGM(nn.Module):
    """SPEC.md section 2 for both modalities; ``kernel`` picks the gate's implementation."""

    def __init__(self, dim: int, kernel: bool, reduction: int = 4):
        super().__init__()
        hidden = max(dim // reduction, 32)
        self.kernel = kernel
        self.mlp = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                               nn.GELU(), nn.Conv2d(hidden, dim, 1)) for _ in range(2))
        self.spatial = nn.ParameterList(nn.Parameter(torch.randn(1, 2 * dim, 3, 3) / math.sqrt(18 * dim))
                                        for _ in range(2))

    def forward(self, x_ct, x_pet):
        p_ct = x_ct.mean((2, 3), keepdim=True, dtype=torch.float32)                    # (Bt, C, 1, 1)
        p_pet = x_pet.mean((2, 3), keepdim=True, dtype=torch.float32)
        c_ct = torch.sigmoid(self.mlp[0](torch.cat([p_pet, p_ct], 1))).flatten(1)    # (Bt, C)
        c_pet = torch.sigmoid(self.mlp[1](torch.cat([p_ct, p_pet], 1))).flatten(1)
        if self.kernel:
            return vk.cgm_gate(x_ct, x_pet, c_ct, c_pet, self.spatial[0], self.spatial[1], backend="triton")
        out = []
        for x, other, c, w in ((x_ct, x_pet, c_ct, self.spatial[0]), (x_pet, x_ct, c_pet, self.spatial[1])):
            s = torch.sigmoid(F.conv2d(torch.cat([other, x], 1), w.to(x.dtype), padding=1))  # autocast's dtype
            out.append(x * (1 + c.to(x.dtype)[:, :, None, None] * s))
        return tuple(out)


def _inputs(case, dtype, seed=0):
    Bt, C, H, W = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(Bt, C, H, W, device=DEVICE, generator=g).to(dtype) for _ in range(2)]


def _module_pair(C):
    torch.manual_seed(0)
    fused, plain = CGM(C, True).to(DEVICE), CGM(C, False).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _model_module(plain):
    """vmambax.models.fusion.CGM with ``plain``'s weights and buffers (the same order of tensors
    under its published names), in train mode, on the fused module path."""
    from vmambax.models.fusion import CGM as ModelCGM
    from vmambax_kernels.cgm import module_triton
    C = plain.spatial[0].shape[1] // 2
    m = ModelCGM(C, backend="triton").to(DEVICE)
    m.load_state_dict(dict(zip(m.state_dict(), plain.state_dict().values())))
    x = torch.empty(2, C, 4, 4, device=DEVICE, dtype=torch.bfloat16)
    why = module_triton.supported("triton", x, x, m.channel_gate_rgb, m.channel_gate_pet)
    if why is not None:
        raise RuntimeError(f"the fused module path would not run: {why}")
    return m


def _copy(module):
    import copy
    return copy.deepcopy(module)


def _fwdbwd(module, xs, grads):
    def run():
        leaves = [x.detach().requires_grad_() for x in xs]
        ys = module(*leaves)
        torch.autograd.backward(ys, grads)
        return ys
    return run


def graphed_ms(module, xs, grads):
    """fwd+bwd of ``module`` replayed from a CUDA graph: the device time, without the host's
    per-op launch and autograd overhead (which sets the eager time at these sizes)."""
    params = list(module.parameters())

    def step():
        leaves = [x.detach().requires_grad_() for x in xs]
        return torch.autograd.grad(module(*leaves), leaves + params, grads)
    return harness.time_ms(harness.cuda_graph(step))


def _kernel_args(case, dtype):
    Bt, C, H, W = CASES[case]
    xs = _inputs(case, dtype)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    cs = [torch.rand(Bt, C, device=DEVICE, generator=g) for _ in range(2)]
    ws = [torch.randn(1, 2 * C, 3, 3, device=DEVICE, generator=g) / math.sqrt(18 * C) for _ in range(2)]
    return xs, cs, ws, _inputs(case, dtype, seed=2)


def kernel_times(case, dtype):
    """(fwd_ms, bwd_ms) of the forward's and the backward's launches alone, replayed from a CUDA
    graph: their device time. Eager calls are bound by the host's launches once the kernels take
    less (from 3c23b23 the forward's three launches take 0.071 ms of device time at cgm1 bf16, and
    an eager call 0.18 ms)."""
    xs, cs, ws, dys = _kernel_args(case, dtype)
    s = cgm_triton._forward(*xs, *cs, *ws, True)[2]
    fwd = harness.time_ms(harness.cuda_graph(lambda: cgm_triton._forward(*xs, *cs, *ws, True)))
    bwd = harness.time_ms(harness.cuda_graph(lambda: cgm_triton._backward(*dys, *xs, *cs, *ws, s, True)))
    return fwd, bwd


def sweep(case, dtype_name) -> dict:
    """The fastest SWEEP configuration of each kernel at ``case`` whose results match the reference."""
    dtype = DTYPES[dtype_name]
    xs, cs, ws, dys = _kernel_args(case, dtype)
    leaves = [t.detach().float().requires_grad_() for t in (*xs, *cs, *ws)]
    ref_y = vk.cgm_gate(*leaves, backend="reference")
    torch.autograd.backward(ref_y, [d.float() for d in dys])
    ref_g = [t.grad for t in leaves]

    def trial(kind):
        y_ct, y_pet, s = cgm_triton._forward(*xs, *cs, *ws, True)
        # timed from CUDA graphs, as kernel_times (eager calls are host-bound)
        if kind == "fwd":
            return (harness.rel_error((y_ct, y_pet), ref_y),
                    harness.cuda_graph(lambda: cgm_triton._forward(*xs, *cs, *ws, True)))
        return (harness.rel_error(cgm_triton._backward(*dys, *xs, *cs, *ws, s, True), ref_g),
                harness.cuda_graph(lambda: cgm_triton._backward(*dys, *xs, *cs, *ws, s, True)))
    print(f"== sweep at {case} {dtype_name}")
    return harness.sweep_configs(cgm_triton.CONFIG_OVERRIDE, SWEEP, trial)


def bench_case(case, dtype_name, copy_tbps, env):
    dtype = DTYPES[dtype_name]
    Bt, C, H, W = CASES[case]
    n, e = Bt * C * H * W, torch.finfo(dtype).bits // 8
    fused, plain = _module_pair(C)
    whole = _model_module(plain)
    xs = _inputs(case, dtype)
    grads = _inputs(case, dtype, seed=1)
    with torch.no_grad():
        # copies: a forward in train mode moves BatchNorm's running stats
        yf, yp, yw = (_copy(m)(*xs) for m in (fused, plain, whole))
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(yf, yp))
    err_whole = max((a.float() - b.float()).abs().max().item() for a, b in zip(yw, yp))
    fwd_floor, fwdbwd_floor = 6 * n * e / COPY_TBPS / 1e9, 12 * n * e / COPY_TBPS / 1e9
    rows = []
    for provider, module in (("triton", fused), ("triton_module", whole), ("torch", plain)):
        with torch.no_grad():
            fwd = harness.time_ms(lambda: module(*xs))
        fwdbwd = harness.time_ms(_fwdbwd(module, xs, grads))
        peak = harness.peak_mb(_fwdbwd(module, xs, grads))
        extra = dict(fwdbwd_graph_ms=graphed_ms(module, xs, grads))
        if provider == "triton":
            kf, kb = kernel_times(case, dtype)
            extra.update(harness.kernel_figures(kf, kb, 4 * n * e, 6 * n * e, copy_tbps, cgm_triton.CONFIG_OVERRIDE))
        rows.append(harness.record("cgm", case, provider, dtype_name, Bt, env, fwd_ms=fwd, fwdbwd_ms=fwdbwd,
                                   peak_mb=peak, floor_ms=fwdbwd_floor, fwd_floor_ms=fwd_floor,
                                   max_abs_diff_vs_torch=err_whole if provider == "triton_module" else err,
                                   **extra))
    return rows


def table_row(r, records, copy_tbps):
    peer, mod = harness.peer(records, r), harness.peer(records, r, "triton_module")
    return dict(case=r["case"], dtype=r["dtype"], fwd=r["fwd_ms"], torch_fwd=peer["fwd_ms"],
                fwdbwd=r["fwdbwd_ms"], torch_fwdbwd=peer["fwdbwd_ms"],
                speedup=harness.ratio(r["fwdbwd_ms"], peer["fwdbwd_ms"]),
                mod_fwd=mod["fwd_ms"], mod_fwdbwd=mod["fwdbwd_ms"],
                mod_speedup=harness.ratio(mod["fwdbwd_ms"], peer["fwdbwd_ms"]),
                graph=r["fwdbwd_graph_ms"], torch_graph=peer["fwdbwd_graph_ms"],
                graph_speedup=harness.ratio(r["fwdbwd_graph_ms"], peer["fwdbwd_graph_ms"]),
                mod_graph=mod["fwdbwd_graph_ms"],
                mod_graph_speedup=harness.ratio(mod["fwdbwd_graph_ms"], peer["fwdbwd_graph_ms"]),
                floor=r["floor_ms"],
                vs_floor=harness.ratio(r["floor_ms"], r["fwdbwd_ms"]),
                k_fwd=r["kernel_fwd_ms"], k_bwd=r["kernel_bwd_ms"],
                bw_fwd=f"{100 * r['kernel_fwd_tbps'] / copy_tbps:.0f}%",
                bw_bwd=f"{100 * r['kernel_bwd_tbps'] / copy_tbps:.0f}%",
                mb=r["peak_mb"], mod_mb=mod["peak_mb"], torch_mb=peer["peak_mb"],
                diff=r["max_abs_diff_vs_torch"], mod_diff=mod["max_abs_diff_vs_torch"])


def main(argv=None):
    harness.kernel_bench_main(
        argv, script="bench_cgm.py", doc=__doc__, op="cgm_gate", cases=CASES, dtypes=DTYPES,
        default_cases=",".join(CASES), default_dtypes="bf16,fp16", bench_case=bench_case,
        sweep=sweep, configs=SWEEP, table_row=table_row,
        title="CGM module fwd/fwdbwd (ms), kernels alone (ms, % of the measured copy bandwidth "
              "{copy_tbps:.2f} TB/s), {gpu}", copy_note=f" (DESIGN.md: {COPY_TBPS})")


if __name__ == "__main__":
    main()
