"""Shared benchmark harness (DESIGN.md, "Benchmark contract" and "Results format").

Each benchmark script supplies only its setup and providers; this module times them, measures
extra memory, writes JSON Lines records into ``benchmarks/results/<gpu-slug>.jsonl`` and prints
ratio tables (vs the peer of the same run, vs a published figure, vs a floor).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def gpu_slug(name: str) -> str:
    """DESIGN.md: the device name lowercased, every run of other characters replaced by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def commit() -> str:
    """The commit under test: $VMAMBAX_COMMIT (set where the tree travels without .git), else git."""
    if os.environ.get("VMAMBAX_COMMIT"):
        return os.environ["VMAMBAX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict:
    """gpu/torch/cuda/triton/commit/date fields that every record carries."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "commit": commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median wall time of ``fn`` in ms: triton.testing.do_bench (CUDA events, L2 flushed between
    runs) when Triton is there, else CUDA events around each call."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return events_median_ms(fn, warmup=1, iters=max(5, int(rep_ms // 5)))


def events_median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median of ``iters`` CUDA-event timings of ``fn`` after ``warmup`` calls (for long calls
    such as a training step, where a time budget in ms would mean one or two repetitions)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn: Callable[[], object]) -> float:
    """Extra memory of one call (DESIGN.md peak_mb): peak allocated during the call minus what was
    allocated before it, in MiB (2**20 bytes)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2 ** 20


def results_path(gpu: str | None = None) -> Path:
    gpu = gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return RESULTS_DIR / f"{gpu_slug(gpu)}.jsonl"


def record(bench: str, case: str, provider: str, dtype: str, batch: int, env: dict | None = None,
           **figures) -> dict:
    """One JSON Lines record of DESIGN.md's format (figures: fwd_ms, fwdbwd_ms, peak_mb, floor_ms...).
    None-valued figures are dropped so a record never claims a number it did not measure."""
    rec = {"bench": bench, "case": case, "provider": provider, "dtype": dtype, "batch": batch}
    rec.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in figures.items() if v is not None})
    rec.update(env or env_info())
    return rec


def append_records(records: Iterable[dict], path: Path | None = None) -> Path:
    records = list(records)
    path = Path(path) if path else results_path(records[0]["gpu"] if records else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def ratio(a: float | None, b: float | None) -> str:
    """'b / a' as 'x.xx' (how many times faster a is than b), '-' when either is missing."""
    if not a or not b:
        return "-"
    return f"{b / a:.2f}"


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> None:
    """Fixed-width table: columns are (header, key); floats printed with 3 significant decimals."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(h.rjust(w) for (h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def copy_tbps() -> float:
    """The card's measured copy bandwidth (TB/s, read + write of 1 GiB): the floor of bandwidth-bound kernels."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def rel_error(out: Iterable, ref: Iterable) -> float:
    """Largest relative L2 error over pairs of tensors (a sweep's sanity check, not the test rule)."""
    return max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(out, ref))


def sweep_configs(override: dict, configs: dict, trial: Callable[[str], tuple]) -> dict:
    """Per kernel kind of ``configs`` ({kind: [launch configuration, ...]}), time each configuration
    set in ``override`` (a Triton backend's CONFIG_OVERRIDE) and keep the fastest whose results
    match: ``trial(kind)`` returns (relative error against a reference, a function to time). A
    relative L2 error of 1e-2 rejects (a race or a bad index shows far above); a configuration that
    does not compile is reported, not fatal. Leaves ``override`` at the winners and returns them."""
    best: dict = {}
    for kind, cfgs in configs.items():
        print(f"== {kind} kernel: ms for each launch configuration")
        best_ms = float("inf")
        for cfg in cfgs:
            override.clear()
            override.update({**best, kind: cfg})
            try:
                err, fn = trial(kind)
                ms = time_ms(fn)
            except Exception as exc:  # e.g. a configuration that does not compile
                print(f"   {cfg or 'default'}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            ok = err < 1e-2
            print(f"   {cfg or 'default'}: {ms:.4f} ms, rel. error {err:.2e}{'' if ok else ' REJECTED'}")
            if ok and ms < best_ms:
                best[kind], best_ms = dict(cfg), ms
    override.clear()
    override.update(best)
    print(f"== using {best}")
    return best
