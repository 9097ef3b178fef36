"""benchmarks/report.py: the README table's ratios against the peer of the same run, eager and
replayed from a CUDA graph."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import report  # noqa: E402


def _row(provider, eager, graph, commit="abc", date="2026-01-01"):
    return dict(gpu="GPU", bench="cgm", case="cgm1", dtype="bf16", provider=provider, fwd_ms=1.0,
                fwdbwd_ms=eager, fwdbwd_graph_ms=graph, commit=commit, date=date)


def test_ratios_against_the_peer_of_the_same_run():
    rows = [_row("torch", 3.0, 1.8), _row("triton", 2.0, 0.6),
            _row("torch", 9.0, 9.0, commit="old", date="2025-01-01")]   # an older run: not the peer
    lines = {ln.split(" | ")[5]: ln for ln in report.table(rows).splitlines()[2:]}
    assert lines["triton"].endswith("| 1.5x | 3.00x | abc |")
    assert lines["torch"].endswith("|  |  | abc |")


def test_no_graph_ratio_without_graph_timings():
    rows = [_row("torch", 3.0, None), _row("triton", 2.0, 0.6)]
    line = [ln for ln in report.table(rows).splitlines() if "| triton |" in ln][0]
    assert line.endswith("| 1.5x |  | abc |")


def test_model_records_keep_their_variants_apart():
    """Compiled, torch-glue and fused-AdamW runs of one provider are separate rows, not the newest
    of one."""
    base = dict(gpu="GPU", bench="model", case="train", dtype="bf16", provider="cuda", commit="abc", date="d")
    rows = [dict(base, train_step_ms=300.0), dict(base, train_step_ms=290.0, compiled="default"),
            dict(base, train_step_ms=280.0, compiled="default", adamw="fused"),
            dict(base, train_step_ms=310.0, glue="torch")]
    labels = {report.label(r) for r in rows}
    assert labels == {"cuda", "cuda (compiled default)", "cuda (compiled default, fused AdamW)", "cuda (torch glue)"}
    assert len(report.newest(rows)) == 4


def test_a_swept_launch_configuration_is_its_own_row():
    """A kernel bench run with --sweep times the chosen configuration: it must not stand in the
    table as the defaults' figure."""
    rows = [_row("triton", 2.0, 0.6), dict(_row("triton", 1.5, 0.5), config={"bwd": {"tile": 2048}}),
            dict(_row("triton", 2.1, 0.6), config="default")]
    assert {report.label(r) for r in rows} == {"triton", 'triton (config {"bwd":{"tile":2048}})'}
    assert len(report.newest(rows)) == 2
