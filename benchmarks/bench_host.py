"""Host time per call of the custom ops: what Python, the dispatcher and the launcher cost before
the GPU sees a kernel. Tiny inputs keep each kernel at a few microseconds, so back-to-back calls
are bound by the host; PyTorch's own op of the same kind is the peer. With --profile, the top
functions (cProfile, cumulative) of one op's calls say where that time goes.

    python benchmarks/bench_host.py [--calls 300] [--profile layer_norm]

Prints microseconds per call (forward, and forward + backward); no records (host time depends on
the CPU, not the card).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import vmambax_kernels as vk  # noqa: E402


def _cases(dev):
    """name -> (forward callable, its differentiable inputs)."""
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=dev).to(dtype).requires_grad_(True)

    x, w, b = rnd(2, 4, 4, 64, dtype=bf), rnd(64), rnd(64)
    y, z = rnd(2, 64, 4, 4), rnd(2, 4, 4, 64, dtype=bf)
    xc, wc, bc = rnd(2, 4, 4, 64, dtype=bf), rnd(64, 1, 3, 3), rnd(64)  # dwconv_silu: channels last
    B, Dm, N, R, H, W = 1, 32, 16, 2, 4, 4
    u = rnd(B, Dm, H, W, dtype=bf)
    xproj = rnd(4, R + 2 * N, Dm)
    dtw, dtb = rnd(4, Dm, R), rnd(4, Dm)
    A, D = rnd(4 * Dm, N), rnd(4 * Dm)  # A_logs
    return {
        "torch layer_norm": (lambda: F.layer_norm(x.float(), (64,), w, b).to(bf), (x, w, b)),
        "layer_norm": (lambda: vk.layer_norm(x, w, b, 1e-5, bf, backend="triton"), (x, w, b)),
        "norm_gate": (lambda: vk.norm_gate(y, z, w, b, 1e-5, backend="triton"), (y, z, w, b)),
        "torch conv2d dw": (lambda: F.silu(F.conv2d(xc.permute(0, 3, 1, 2), wc.to(bf), bc.to(bf), padding=1,
                                                    groups=64)), (xc, wc, bc)),
        "dwconv_silu": (lambda: vk.dwconv_silu(xc, wc, bc, backend="triton"), (xc, wc, bc)),
        "scan cuda": (lambda: vk.cross_selective_scan_2d(u, xproj, dtw, dtb, A, D, backend="cuda"),
                      (u, xproj, dtw, dtb, A, D)),
        "scan triton": (lambda: vk.cross_selective_scan_2d(u, xproj, dtw, dtb, A, D, backend="triton"),
                        (u, xproj, dtw, dtb, A, D)),
    }


def _per_call_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile", default="", help="a case name to cProfile (forward + backward)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host.py: needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"host time per call (us), {args.calls} calls, {torch.cuda.get_device_name(dev)}")
    print(f"{'op':>18} {'fwd':>8} {'fwd+bwd':>8}")
    for name, (fwd, inputs) in _cases(dev).items():
        try:
            with torch.no_grad():
                f = _per_call_us(fwd, args.calls)
            fb = _per_call_us(lambda: fwd().float().sum().backward(), args.calls)
        except Exception as exc:  # a backend absent here: say so and go on
            print(f"{name:>18} unavailable: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        print(f"{name:>18} {f:8.1f} {fb:8.1f}")
        if name == args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                fwd().float().sum().backward()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
