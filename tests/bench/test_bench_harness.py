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


def test_sweep_fwd_bwd_checks_both_kernels_against_the_reference(monkeypatch):
    # y = 2 x: a "kernel" pair that is right, then one whose backward is off by 10 %
    monkeypatch.setattr(harness, "time_ms", lambda fn: 1.0)
    x, grad = torch.randn(5), torch.randn(5)
    override = {}

    def backward(saved):
        return (grad * saved * (1.1 if override["bwd"].get("bad") else 1.0),)
    best = harness.sweep_fwd_bwd(override, {"fwd": [dict()], "bwd": [dict(bad=True), dict()]},
                                 lambda t: 2 * t, (x,), grad, lambda: (2 * x, torch.tensor(2.0)), backward)
    assert best == {"fwd": {}, "bwd": {}}   # the bad backward is rejected though listed first


def test_fwdbwd_runs_on_fresh_leaves_with_the_given_strides():
    x = torch.randn(4, 6)[:, ::2]
    out = harness.fwdbwd(lambda t: (t * 3).sum(), (x,), torch.tensor(1.0))()
    # (3 t).sum() and 3 t.sum() round differently: bound the difference by the terms' size, not the
    # sum's (a sum near zero failed ~3 % of random draws at pytest.approx's default relative 1e-6)
    assert out.item() == pytest.approx(3 * x.sum().item(), rel=1e-6, abs=1e-6 * 3 * x.abs().sum().item())
    assert x.grad is None and not x.requires_grad


def _fake_records():
    def rec(case, dtype, provider, fwd, fwdbwd, **extra):
        return harness.record("op", case, provider, dtype, 8, env={"gpu": "fake"}, fwd_ms=fwd, fwdbwd_ms=fwdbwd,
                              peak_mb=10.0 if provider == "torch" else 4.0, floor_ms=0.5,
                              max_abs_diff_vs_torch=0.0, **extra)
    figures = harness.kernel_figures(0.25, 0.5, 10 ** 9, 2 * 10 ** 9, 3.0, {})
    return [rec("a", "bf16", "triton", 1.0, 2.0, **figures), rec("a", "bf16", "torch", 3.0, 5.0),
            rec("a", "fp16", "torch", 7.0, 9.0), rec("a", "fp16", "triton", 1.0, 1.5, **figures)]


def test_kernel_figures():
    f = harness.kernel_figures(0.25, 0.5, 10 ** 9, 2 * 10 ** 9, 3.0, {"fwd": {"BD": 64}})
    assert f == dict(kernel_fwd_ms=0.25, kernel_bwd_ms=0.5, kernel_fwd_tbps=pytest.approx(4.0),
                     kernel_bwd_tbps=pytest.approx(4.0), copy_tbps=3.0, config={"fwd": {"BD": 64}})
    assert harness.kernel_figures(1, 1, 1, 1, 1, {})["config"] == "default"


def test_bandwidth_row_compares_with_the_torch_record_of_the_same_case_and_dtype():
    records = _fake_records()
    row = harness.bandwidth_row(records[3], records, 3.0)
    assert list(row) == ["case", "dtype", "fwd", "torch_fwd", "fwd_speedup", "fwdbwd", "torch_fwdbwd", "speedup",
                         "floor", "vs_floor", "k_fwd", "k_bwd", "bw_fwd", "bw_bwd", "mb", "torch_mb", "diff"]
    assert (row["dtype"], row["torch_fwd"], row["fwd_speedup"], row["speedup"]) == ("fp16", 7.0, "7.00", "6.00")
    assert (row["vs_floor"], row["bw_fwd"], row["bw_bwd"], row["torch_mb"]) == ("3.00", "133%", "133%", 10.0)
    assert harness.peer(records, records[0], "triton") is records[0]


@pytest.fixture
def fake_gpu(monkeypatch):
    """kernel_bench_main's checks pass as on a GPU with the op's triton backend; 3.0 TB/s copies."""
    class Why:
        available, reason = True, ""
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.vk, "available_backends", lambda op: {"triton": Why()})
    monkeypatch.setattr(harness, "env_info", lambda: {"gpu": "fake"})
    monkeypatch.setattr(harness, "copy_tbps", lambda: 3.0)


def test_kernel_bench_main_prints_one_row_per_triton_record(fake_gpu, capsys):
    swept = []
    args = dict(script="bench_x.py", doc="x benchmark\n", op="x", cases={"a": 1, "b": 2},
                dtypes={"bf16": 0, "fp16": 0}, default_cases="a", default_dtypes="bf16,fp16",
                bench_case=lambda case, dtype, copy, env: [r for r in _fake_records() if r["dtype"] == dtype],
                sweep=lambda case, dtype: swept.append((case, dtype)), table_row=harness.bandwidth_row,
                title="x at {copy_tbps:.2f} TB/s, {gpu}")
    harness.kernel_bench_main(["--sweep", "--no-record"], **args)
    out = capsys.readouterr().out.splitlines()
    assert swept == [("a", "bf16")]
    assert out[0] == "== fake: copy bandwidth 3.00 TB/s" and out[1] == "x at 3.00 TB/s, fake"
    assert out[2].split()[:3] == ["case", "dtype", "fwd"] and len(out) == 5
    assert [line.split()[1] for line in out[3:]] == ["bf16", "fp16"]
    with pytest.raises(SystemExit, match="unknown cases/dtypes"):
        harness.kernel_bench_main(["--cases", "c"], **args)


def test_kernel_bench_main_configs_replace_the_sweep_list(fake_gpu):
    configs = {"fwd": [dict()], "bwd": [dict(), dict(BC=32)]}
    seen = []
    args = dict(script="bench_x.py", doc="x benchmark\n", op="x", cases={"a": 1}, dtypes={"bf16": 0},
                default_cases="a", default_dtypes="bf16", bench_case=lambda *a: [],
                sweep=lambda case, dtype: seen.append({k: list(v) for k, v in configs.items()}),
                table_row=harness.bandwidth_row, title="x", configs=configs)
    harness.kernel_bench_main(["--sweep-all", "--configs", '{"bwd": [{"bcz": 32}, {"evict": true}]}'], **args)
    assert seen == [{"bwd": [{"bcz": 32}, {"evict": True}]}]     # only the kinds named, in place
    for bad, why in (('{"bwd": [{}]}', "goes with --sweep"), ('{"bwd": [', "not JSON"),
                     ('{"other": [{}]}', "kinds among"), ('{"bwd": {}}', "kinds among")):
        argv = ["--configs", bad] if why == "goes with --sweep" else ["--sweep-all", "--configs", bad]
        with pytest.raises(SystemExit, match=why):
            harness.kernel_bench_main(argv, **args)
    with pytest.raises(SystemExit, match="no launch configurations"):
        harness.kernel_bench_main(["--sweep", "--configs", "{}"], **dict(args, configs=None))
