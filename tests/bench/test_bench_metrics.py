"""benchmarks/bench_metrics.py: its cases are the ones it names, ours equals medpy on each of them,
and a run prints one timed line per case with medpy's time beside ours."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import bench_metrics  # noqa: E402
from vmambax import metrics  # noqa: E402

medpy_binary = pytest.importorskip("medpy.metric.binary")


def test_cases_agree_with_medpy():
    for name, (p, t) in bench_metrics.cases().items():
        assert p.shape == t.shape == (bench_metrics.SIZE,) * 2 and p.any() and t.any(), name
        assert metrics.hd95(p, t) == pytest.approx(medpy_binary.hd95(p, t), rel=1e-12), name


def test_prints_a_line_per_case(capsys):
    bench_metrics.main(["--repeat", "1", "--no-save"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("hd95_")]
    assert [ln.split()[0] for ln in lines] == list(bench_metrics.cases())
    for ln in lines:
        assert re.search(r"vmambax +[\d.]+ ms +medpy +[\d.]+ ms +[\d.]+x$", ln), ln
