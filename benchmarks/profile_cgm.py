"""Where the CGM gate's kernel time goes: device time of each launch of the forward and the
backward (torch.profiler), per case, with the bytes each pass must move and the bandwidth the whole
pass reaches. A diagnostic beside bench_cgm.py (which records the timings); it records nothing.

    python benchmarks/profile_cgm.py [--cases cgm1,cgm4] [--dtypes bf16] [--iters 20] [--config JSON]

--config sets the gate's launch options for the run, as bench_cgm.py --sweep does for each of its
configurations (e.g. '{"bwd": {"gemm": true}}' profiles the GEMM-form backward at every width).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_cgm  # noqa: E402
from vmambax_kernels.cgm import triton as cgm_triton  # noqa: E402


def launches(fn, iters):
    """{kernel name: mean device ms per call of fn} over ``iters`` profiled calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time_total / 1e3 / iters
    return dict(per)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="cgm1,cgm2,cgm3,cgm4")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--config", help="launch options by kernel kind (a CONFIG_OVERRIDE), as JSON")
    a = ap.parse_args(argv)
    if a.config:
        cgm_triton.CONFIG_OVERRIDE.update(json.loads(a.config))
    for dtype_name in a.dtypes.split(","):
        dtype = bench_cgm.DTYPES[dtype_name]
        for case in a.cases.split(","):
            Bt, C, H, W = bench_cgm.CASES[case]
            e = torch.finfo(dtype).bits // 8
            n_mb = Bt * C * H * W * e / 1e6          # one modality's x
            xs, cs, ws, dys = bench_cgm._kernel_args(case, dtype)
            s = cgm_triton._forward(*xs, *cs, *ws, True)[2]
            passes = {"fwd": (lambda: cgm_triton._forward(*xs, *cs, *ws, True), 4 * n_mb),
                      "bwd": (lambda: cgm_triton._backward(*dys, *xs, *cs, *ws, s, True), 6 * n_mb)}
            for kind, (fn, mb) in passes.items():
                per = launches(fn, a.iters)
                total = sum(per.values())
                if not total:       # no CUDA events: another profiler (Nsight Compute) holds CUPTI
                    print(f"== {case} {dtype_name} {kind}: no kernel events recorded")
                    continue
                print(f"== {case} {dtype_name} {kind}: {total:.4f} ms, {mb:.1f} MB must move -> "
                      f"{mb / total / 1e3:.2f} TB/s")  # MB / ms = GB/s
                for name, ms in sorted(per.items(), key=lambda kv: -kv[1]):
                    print(f"   {ms:8.4f} ms  {100 * ms / total:5.1f} %  {name[:90]}")


if __name__ == "__main__":
    main()
