"""CPU time of HD95 on one 512x512 slice: ours (vmambax.metrics.hd95) against medpy's hd95, the
definition it follows, in the same run. `vmambax evaluate` computes it for every slice on the host,
where it used to take ~4x the GPU's time for the batch's forward.

    python benchmarks/bench_metrics.py [--repeat 20] [--no-save]

Cases: a predicted and a true lesion of radius r pixels, offset from each other (r = 10, 40, 120),
and two masks that cover most of the slice ("large"). Prints ms per call and appends records (bench
"metrics", providers "vmambax" and "medpy", the time per call as fwd_ms) to benchmarks/results/cpu.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
from vmambax import metrics  # noqa: E402

SIZE = 512


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = {f"hd95_r{r}": (((yy - 250) ** 2 + (xx - 260) ** 2) < r ** 2,
                          ((yy - 255) ** 2 + (xx - 250) ** 2) < (r - 2) ** 2) for r in (10, 40, 120)}
    out["hd95_large"] = ((yy + xx) % 97 < 90, (yy * 3 + xx) % 89 < 80)
    return out


def ms_per_call(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) * 1000 / repeat


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    try:
        from medpy.metric.binary import hd95 as medpy_hd95
    except ImportError:
        medpy_hd95 = None
        print("medpy is not installed (pip install .[test]): timing ours alone")
    env, records = harness.env_info(), []
    for name, (p, t) in cases().items():
        ours = ms_per_call(lambda: metrics.hd95(p, t), args.repeat)
        line = f"{name:12s} vmambax {ours:8.2f} ms"
        records.append(harness.record("metrics", name, "vmambax", "bool", 1, env, fwd_ms=ours, size=SIZE))
        if medpy_hd95 is not None:
            peer = ms_per_call(lambda: medpy_hd95(p, t), args.repeat)
            line += f"   medpy {peer:8.2f} ms   {peer / ours:5.1f}x"
            records.append(harness.record("metrics", name, "medpy", "bool", 1, env, fwd_ms=peer, size=SIZE))
        print(line, flush=True)
    if not args.no_save:
        print("appended to", harness.append_records(records, harness.RESULTS_DIR / "cpu.jsonl"))


if __name__ == "__main__":
    main()
