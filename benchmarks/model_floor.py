"""The floor of a vMambaX training step and of inference (issue 7: how far each target is from the
sum of its parts' floors), computed on the CPU from the model's own shapes at DESIGN.md's H100 limits.

    python benchmarks/model_floor.py [--batch 8] [--size 512] [--measured-train 331] [--measured-infer 83]

Parts and their floors:
- scans: one exp per element (b, walk, channel, position, state) forward at the MUFU rate (DESIGN.md,
  "The limits": 16 ex2 / clock / SM, ~4.2e12 / s); the backward, which recomputes the forward and
  runs a reverse scan, about 3x the forward's floor (DESIGN.md's estimate).
- GEMMs and convolutions: the model's multiply-adds outside the scans (``count_flops``, the
  fvcore convention) at the H100 SXM's dense 16-bit tensor-core rate (989e12 FLOP/s); a training
  step does each three times (forward, input gradient, weight gradient).
- the optimizer: AdamW reads parameter, gradient and both moments and writes three of them, fp32,
  at the copy bandwidth (3.0 TB/s).
Everything else (norms, elementwise glue, layout copies) is taken to fuse into those parts, so the
floor is a lower bound; the measured figures it is compared with come from bench_model.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vmambax.models import VMambaX, count_flops  # noqa: E402
from vmambax.models.flops import PARTS, _meta_copy  # noqa: E402
from vmambax_kernels.modules import ss2d as ss2d_module  # noqa: E402

MUFU_PER_S = 4.2e12      # DESIGN.md, "The limits"
TENSOR_FLOP_PER_S = 989e12  # H100 SXM, dense bf16/fp16
COPY_BYTES_PER_S = 3.0e12   # DESIGN.md, measured
BWD_OVER_FWD = 3.0          # DESIGN.md: the scan's backward, about 3x the forward's floor


def scan_elements(model: VMambaX, batch: int, size: int) -> dict[str, int]:
    """Elements (b, walk, channel, position, state) of every scan of one forward, per model part."""
    meta = _meta_copy(model).eval()
    meta.set_backend("reference")   # the only backend that runs on meta tensors
    calls = []
    original = ss2d_module.cross_selective_scan_2d

    def counting(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, backend=None):
        Bt, Dm, H, W = x.shape
        calls.append((current[0], 4 * Bt * Dm * H * W * A_logs.shape[-1]))
        return original(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend=backend)

    current = [""]
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=name: current.__setitem__(0, n))
             for name, m in meta.named_modules() if isinstance(m, ss2d_module.SS2D)]
    ss2d_module.cross_selective_scan_2d = counting
    try:
        x = torch.zeros(batch, 3, size, size, device="meta")
        with torch.no_grad():
            meta(x, x.clone())
    finally:
        ss2d_module.cross_selective_scan_2d = original
        for h in hooks:
            h.remove()
    out = {part: 0 for part in PARTS}
    for name, n in calls:
        part = next(p for p, prefixes in PARTS.items() if any(name.startswith(q) for q in prefixes))
        out[part] += n
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--measured-train", type=float, default=None, help="ms, from bench_model.py")
    ap.add_argument("--measured-infer", type=float, default=None, help="ms, from bench_model.py")
    args = ap.parse_args(argv)
    model = VMambaX()
    elements = scan_elements(model, args.batch, args.size)
    flops = count_flops(model, (args.size, args.size), batch=args.batch)
    macs = flops["total"] - flops["scans"]
    params = sum(p.numel() for p in model.parameters())

    scan_fwd = {p: n / MUFU_PER_S * 1e3 for p, n in elements.items()}
    gemm_fwd = 2 * macs / TENSOR_FLOP_PER_S * 1e3
    adamw = params * 4 * 7 / COPY_BYTES_PER_S * 1e3
    infer = sum(scan_fwd.values()) + gemm_fwd
    train = (1 + BWD_OVER_FWD) * sum(scan_fwd.values()) + 3 * gemm_fwd + adamw
    print(f"vMambaX floor at batch {args.batch}, {args.size}x{args.size} (H100 limits of DESIGN.md)")
    print(f"  scan elements (one exp each, forward): {sum(elements.values()) / 1e9:.1f} G; per part: "
          + ", ".join(f"{p} {n / 1e9:.1f} G" for p, n in elements.items()))
    print(f"  scans: forward {sum(scan_fwd.values()):.2f} ms, forward + backward "
          f"{(1 + BWD_OVER_FWD) * sum(scan_fwd.values()):.2f} ms")
    print(f"  GEMMs and convolutions: {macs / 1e9:.0f} G multiply-adds, forward {gemm_fwd:.2f} ms, "
          f"training {3 * gemm_fwd:.2f} ms")
    print(f"  AdamW over {params / 1e6:.1f} M parameters: {adamw:.2f} ms")
    for what, floor, measured in (("training step", train, args.measured_train),
                                  ("inference", infer, args.measured_infer)):
        tail = f"; measured {measured:.0f} ms = {measured / floor:.1f}x the floor" if measured else ""
        print(f"  {what}: floor {floor:.1f} ms{tail}")


if __name__ == "__main__":
    main()
