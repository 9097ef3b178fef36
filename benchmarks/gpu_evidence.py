"""pytest plugin: leave the evidence of a GPU test run (DESIGN.md, "Results format").

    python -m pytest -m gpu -p benchmarks.gpu_evidence tests/ops

writes ``benchmarks/results/gpu-tests/<commit>.json`` (or into $VMAMBAX_EVIDENCE_DIR): passed /
failed / skipped per test file, the failures' names, the card, the backends available and the
commit of the kernel sources tested ($VMAMBAX_COMMIT where the tree travels without .git).
Each failure is also appended to ``failures-live.txt`` beside it as it happens, with the start of
its message: a run killed by a time limit writes no JSON, and one such run lost the names of its
failures.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_counts: dict = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0, "error": 0})
_failures: list = []
_skip_reasons: dict = defaultdict(int)
_live: Path | None = None


def _out_dir() -> Path:
    return Path(os.environ.get("VMAMBAX_EVIDENCE_DIR", ROOT / "benchmarks" / "results" / "gpu-tests"))


def pytest_configure(config):
    global _live
    if not hasattr(config, "workerinput"):  # the controller sees every worker's reports
        _out_dir().mkdir(parents=True, exist_ok=True)
        _live = _out_dir() / "failures-live.txt"


def _record_live(report) -> None:
    if _live is None:
        return
    message = "\n".join("  " + line for line in report.longreprtext.splitlines()[-40:])
    with open(_live, "a") as f:
        f.write(f"{report.nodeid} ({report.when})\n{message}\n")


def _kernel_commit() -> str:
    if os.environ.get("VMAMBAX_COMMIT"):
        return os.environ["VMAMBAX_COMMIT"]
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", "csrc", "vmambax_kernels"],
                             cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            _counts[path]["passed"] += 1
        elif report.skipped:
            _counts[path]["skipped"] += 1
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            _skip_reasons[reason] += 1
        elif report.when == "setup":
            _counts[path]["error"] += 1
            _failures.append(report.nodeid)
            _record_live(report)
        else:
            _counts[path]["failed"] += 1
            _failures.append(report.nodeid)
            _record_live(report)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # pytest-xdist worker: the controller writes the file
        return
    import torch
    try:
        from vmambax_kernels import available_backends
        backends = {k: {"available": s.available, "reason": s.reason} for k, s in available_backends().items()}
    except Exception as exc:  # evidence must be written even when the package is broken
        backends = {"error": repr(exc)}
    commit = _kernel_commit()
    out_dir = _out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = {k: sum(c[k] for c in _counts.values()) for k in ("passed", "failed", "skipped", "error")}
    evidence = {
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "backends": backends,
        "args": list(session.config.invocation_params.args),
        "exitstatus": int(exitstatus),
        "totals": totals,
        "files": dict(sorted(_counts.items())),
        "failures": _failures,
        "skip_reasons": dict(_skip_reasons),
    }
    path = out_dir / f"{commit}.json"
    # committed evidence names no machine paths: the checkout's own become repository-relative
    path.write_text(json.dumps(evidence, indent=1).replace(str(ROOT) + os.sep, "") + "\n")
    print(f"\ngpu_evidence: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {totals}")
