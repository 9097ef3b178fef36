"""Regenerate the README's performance table from benchmarks/results/*.jsonl.

    python benchmarks/report.py            # rewrite the table between the README markers
    python benchmarks/report.py --print    # print it instead

For each (card, bench, scope, case, dtype, provider) the newest record wins, and each case shows
only the providers of its newest run; ratios are taken only between records of the same run
(same commit and card), as DESIGN.md requires.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
FIGS = ("fwd_ms", "fwdbwd_ms", "peak_mb", "train_step_ms", "infer_ms", "peak_gb")


def load(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(results_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def label(r: dict) -> str:
    """The provider as the table shows it: model records also differ by SS2D's glue, compiling and
    the AdamW implementation, kernel records by a launch configuration other than the defaults."""
    extra = []
    if r.get("glue") == "torch" and r.get("provider") != "unfused_mamba":
        extra.append("torch glue")
    if r.get("compiled"):
        extra.append(f"compiled {r['compiled']}")
    if r.get("adamw"):
        extra.append(f"{r['adamw']} AdamW")
    if r.get("config") not in (None, "default"):   # a kernel bench timed after --sweep chose a launch
        extra.append("config " + json.dumps(r["config"], separators=(",", ":"), sort_keys=True))
    return r.get("provider", "") + (f" ({', '.join(extra)})" if extra else "")


def newest(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        key = (r.get("gpu"), r.get("bench"), r.get("scope", ""), r.get("case"), r.get("dtype"), label(r))
        if key not in best or r.get("date", "") >= best[key].get("date", ""):
            best[key] = r
    return best


def table(rows: list[dict]) -> str:
    best = newest(rows)
    groups: dict = {}
    for (gpu, bench, scope, case, dtype, provider), r in best.items():
        groups.setdefault((gpu, bench, scope, case, dtype), {})[provider] = r
    # "graph": fwd+bwd replayed from a CUDA graph where the bench records it (the device's time;
    # eager figures of small modules are bound by the host's launch overhead)
    lines = ["| card | bench | scope | case | dtype | provider | " + " | ".join(FIGS[:3])
             + " | train/infer ms | vs peer (fwdbwd) | vs peer (graph) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        # Only the newest run of each case: a provider that run did not measure (a kernel version
        # since removed, a backend left out) would otherwise stand beside it with an older number.
        latest = max(groups[key].values(), key=lambda r: r.get("date", ""))
        provs = {p: r for p, r in groups[key].items() if r.get("commit") == latest.get("commit")}
        peer = provs.get("unfused_mamba") or provs.get("unfused_torch") or provs.get("torch")
        for prov, r in sorted(provs.items()):
            ratio = graph = ""
            if peer is not None and r is not peer and r.get("commit") == peer.get("commit"):
                a, b = r.get("fwdbwd_ms") or r.get("train_step_ms"), peer.get("fwdbwd_ms") or peer.get("train_step_ms")
                if a and b:
                    ratio = f"{b / a:.1f}x"
                a, b = r.get("fwdbwd_graph_ms"), peer.get("fwdbwd_graph_ms")
                if a and b:
                    graph = f"{b / a:.2f}x"
            figs = [f"{r[f]:.3g}" if isinstance(r.get(f), (int, float)) else "" for f in FIGS[:3]]
            model = "/".join(f"{r[f]:.1f}" for f in ("train_step_ms", "infer_ms") if isinstance(r.get(f), (int, float)))
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {prov} | " + " | ".join(figs)
                         + f" | {model} | {ratio} | {graph} | {str(r.get('commit', ''))[:8]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the table instead of editing README.md")
    args = ap.parse_args()
    text = table(load(ROOT / "benchmarks" / "results"))
    if args.print:
        print(text)
        return
    readme = ROOT / "README.md"
    src = readme.read_text()
    if BEGIN not in src or END not in src:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = src.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
