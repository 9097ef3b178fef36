"""Shared benchmark harness (DESIGN.md, "Benchmark contract" and "Results format").

Each benchmark script supplies only its setup and providers; this module times them, measures
extra memory, writes JSON Lines records into ``benchmarks/results/<gpu-slug>.jsonl`` and prints
ratio tables (vs the peer of the same run, vs a published figure, vs a floor). The kernel
benchmarks (bench_cgm, bench_dwconv, bench_layer_norm, bench_norm_gate) share their command line
and table through ``kernel_bench_main``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

import vmambax_kernels as vk

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


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once into a CUDA graph (after warm-up calls on a side stream, as capture
    requires); returns the replay, which reruns the same kernels on the same buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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


def sweep_fwd_bwd(override: dict, configs: dict, ref_fn: Callable, tensors, grad, forward: Callable,
                  backward: Callable) -> dict:
    """``sweep_configs`` of a forward and a backward kernel ("fwd" and "bwd" of ``configs``),
    checked against ``ref_fn`` on fp32 leaves of ``tensors`` with output gradient ``grad``:
    ``forward()`` returns (out, *saved), ``backward(*saved)`` the gradients in the order of
    ``tensors``."""
    leaves = [t.detach().float().requires_grad_() for t in tensors]
    ref = ref_fn(*leaves)
    ref.backward(grad.float())
    ref_g = [t.grad for t in leaves]

    def trial(kind):
        out, *saved = forward()
        if kind == "fwd":
            return rel_error((out,), (ref,)), forward
        return rel_error(backward(*saved), ref_g), lambda: backward(*saved)
    return sweep_configs(override, configs, trial)


def fwdbwd(fn: Callable, tensors, grad) -> Callable[[], torch.Tensor]:
    """A step to time: ``fn`` on fresh leaves of ``tensors``, then backward of ``grad``."""
    def run():
        leaves = [t.detach().requires_grad_() for t in tensors]   # detach keeps the strides
        out = fn(*leaves)
        out.backward(grad)
        return out
    return run


def kernel_figures(kf: float, kb: float, fwd_bytes: int, bwd_bytes: int, copy_tbps: float,
                   override: dict) -> dict:
    """A "triton" record's kernel figures: the forward and backward kernels' times (ms), the
    bandwidth they achieve on the bytes they must move (TB/s), the copy bandwidth of the same run
    and the launch configuration (``override``: the backend's CONFIG_OVERRIDE)."""
    return dict(kernel_fwd_ms=kf, kernel_bwd_ms=kb,
                kernel_fwd_tbps=fwd_bytes / (kf * 1e-3) / 1e12,
                kernel_bwd_tbps=bwd_bytes / (kb * 1e-3) / 1e12,
                copy_tbps=copy_tbps, config=dict(override) or "default")


def peer(records: list[dict], r: dict, provider: str = "torch") -> dict:
    """The record of ``provider`` at ``r``'s case and dtype."""
    return next(p for p in records if p["provider"] == provider and p["case"] == r["case"]
                and p["dtype"] == r["dtype"])


def speedup_cells(r: dict, p: dict) -> dict:
    """A table row's first cells: case, dtype, and ``r``'s fwd and fwdbwd times against ``p``'s."""
    return dict(case=r["case"], dtype=r["dtype"], fwd=r["fwd_ms"], torch_fwd=p["fwd_ms"],
                fwd_speedup=ratio(r["fwd_ms"], p["fwd_ms"]),
                fwdbwd=r["fwdbwd_ms"], torch_fwdbwd=p["fwdbwd_ms"],
                speedup=ratio(r["fwdbwd_ms"], p["fwdbwd_ms"]))


def bandwidth_row(r: dict, records: list[dict], copy_tbps: float) -> dict:
    """The table row of a bandwidth-bound op's "triton" record (layer_norm, norm_gate): speedups
    over torch, fwdbwd against its floor, the kernels alone (ms, % of the copy bandwidth), memory,
    the largest difference from torch."""
    p = peer(records, r)
    return dict(speedup_cells(r, p), floor=r["floor_ms"], vs_floor=ratio(r["floor_ms"], r["fwdbwd_ms"]),
                k_fwd=r["kernel_fwd_ms"], k_bwd=r["kernel_bwd_ms"],
                bw_fwd=f"{100 * r['kernel_fwd_tbps'] / copy_tbps:.0f}%",
                bw_bwd=f"{100 * r['kernel_bwd_tbps'] / copy_tbps:.0f}%",
                mb=r["peak_mb"], torch_mb=p["peak_mb"], diff=r["max_abs_diff_vs_torch"])


def kernel_bench_main(argv, *, script: str, doc: str, op: str, cases: dict, dtypes: dict,
                      default_cases: str, default_dtypes: str, bench_case: Callable, sweep: Callable,
                      table_row: Callable, title: str, copy_note: str = "", configs: dict | None = None) -> None:
    """main() of a kernel benchmark: ``--cases``, ``--dtypes`` (comma-separated keys of ``cases``
    and ``dtypes``), ``--sweep`` (``sweep(first case, first dtype name)`` before the timing),
    ``--sweep-all`` (``sweep`` of every case and dtype, no timing), ``--configs JSON`` (the launch
    configurations those sweep, in place of ``configs``, the script's own {kind: [configuration, ...]};
    its kinds only, so that a sweep of one kernel compiles nothing else), ``--no-record``. It needs
    CUDA and ``op``'s triton backend, measures the copy bandwidth, takes ``bench_case(case, dtype
    name, copy_tbps, env)``'s records of every case and dtype, prints ``table_row(record, records,
    copy_tbps)`` for each "triton" record under ``title`` (formatted with copy_tbps and gpu) and
    appends the records to the results file."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--cases", default=default_cases)
    ap.add_argument("--dtypes", default=default_dtypes)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-all", action="store_true",
                    help="sweep every case and dtype and stop (per-case data to choose defaults by)")
    ap.add_argument("--configs", help='launch configurations to sweep, e.g. \'{"bwd": [{}, {"BC": 32}]}\'')
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.configs:
        if not (args.sweep or args.sweep_all):
            sys.exit(f"{script}: --configs goes with --sweep or --sweep-all")
        if configs is None:
            sys.exit(f"{script}: --configs: this benchmark has no launch configurations to sweep")
        try:
            chosen = json.loads(args.configs)
        except json.JSONDecodeError as exc:
            sys.exit(f"{script}: --configs is not JSON: {exc}")
        unknown = set(chosen) - set(configs)
        if unknown or not all(isinstance(v, list) for v in chosen.values()):
            sys.exit(f"{script}: --configs takes {{kind: [configuration, ...]}} with kinds among {list(configs)}")
        configs.clear()
        configs.update(chosen)
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU")
    why = vk.available_backends(op)["triton"]
    if not why.available:
        sys.exit(f"{script}: the triton backend cannot run: {why.reason}")
    case_names, dtype_names = args.cases.split(","), args.dtypes.split(",")
    bad = [c for c in case_names if c not in cases] + [d for d in dtype_names if d not in dtypes]
    if bad:
        sys.exit(f"{script}: unknown cases/dtypes {bad}; cases: {list(cases)}, dtypes: {list(dtypes)}")
    env = env_info()
    copy = copy_tbps()
    print(f"== {env['gpu']}: copy bandwidth {copy:.2f} TB/s{copy_note}")
    if args.sweep_all:
        for dtype in dtype_names:
            for case in case_names:
                sweep(case, dtype)
        return
    if args.sweep:
        sweep(case_names[0], dtype_names[0])
    records = []
    for dtype in dtype_names:
        for case in case_names:
            records += bench_case(case, dtype, copy, env)
    table = [table_row(r, records, copy) for r in records if r["provider"] == "triton"]
    print_table(table, [(k, k) for k in table[0]] if table else [],
                title=title.format(copy_tbps=copy, gpu=env["gpu"]))
    if not args.no_record:
        print("== records appended to", append_records(records))
