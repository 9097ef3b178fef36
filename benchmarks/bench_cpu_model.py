"""CPU timing of the whole model on the reference backend (issue: "fast enough to train on a CPU").

    python benchmarks/bench_cpu_model.py            # batch 2, 128x128, forward + backward

The target is under 30 s on a 2-core CPU. This is a benchmark, not a test: a timed assertion
fails on a loaded machine for reasons that are not the code's. It prints the figures and appends
one record (bench "model", case "cpu_fwdbwd") to benchmarks/results/cpu.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
from vmambax.models import VMambaX  # noqa: E402

TARGET_S = 30.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = VMambaX(backend="reference").train()
    g = torch.Generator().manual_seed(1)
    ct, pet = (torch.randn(args.batch, 1, args.size, args.size, generator=g) for _ in range(2))
    start = time.perf_counter()
    out = model(ct, pet)
    fwd = time.perf_counter() - start
    out.square().mean().backward()
    total = time.perf_counter() - start
    print(f"vMambaX on CPU ({torch.get_num_threads()} threads), batch {args.batch}, {args.size}x{args.size}, "
          f"reference backend: forward {fwd:.1f} s, backward {total - fwd:.1f} s, total {total:.1f} s "
          f"(target < {TARGET_S:.0f} s on 2 cores: {'met' if total < TARGET_S else 'missed'})")
    if not args.no_save:
        rec = harness.record("model", "cpu_fwdbwd", "reference", "fp32", args.batch, fwd_s=fwd, fwdbwd_s=total,
                             threads=torch.get_num_threads(), size=args.size)
        print("appended to", harness.append_records([rec], harness.RESULTS_DIR / "cpu.jsonl"))


if __name__ == "__main__":
    main()
