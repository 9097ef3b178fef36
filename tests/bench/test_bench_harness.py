"""The benchmark harness's launch-configuration sweep (CPU: the timing is replaced)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import harness  # noqa: E402


def test_sweep_keeps_the_fastest_matching_configuration(monkeypatch):
    # the "time" of a configuration is its "ms" entry; "err" is its error against the reference
    override = {}
    monkeypatch.setattr(harness, "time_ms", lambda fn: fn())

    def trial(kind):
        cfg = override[kind]
        if cfg.get("broken"):
            raise RuntimeError("does not compile")
        return cfg.get("err", 0.0), lambda: cfg["ms"]
    configs = {"fwd": [dict(ms=3.0), dict(ms=1.0, err=0.5), dict(ms=2.0), dict(broken=True)],
               "bwd": [dict(ms=5.0), dict(ms=4.0)]}
    best = harness.sweep_configs(override, configs, trial)
    assert best == {"fwd": dict(ms=2.0), "bwd": dict(ms=4.0)}   # 1.0 is rejected: wrong results
    assert override == best


def test_rel_error():
    a = torch.tensor([1.0, 2.0])
    assert harness.rel_error([a], [a]) == 0
    assert harness.rel_error([a, a + 1], [a, a]) == pytest.approx((2 ** 0.5) / 5 ** 0.5)
