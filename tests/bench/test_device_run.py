"""benchmarks/device_run.sh: the pytest arguments of --tests keep their shell quoting, with stand-in
python3 / nvcc that only record how they were called."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_run.sh"


def test_tests_argument_keeps_a_quoted_k_expression(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for tool in ("python3", "nvcc"):  # one line per call, each argument in brackets
        (bin_dir / tool).write_text(f'#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done >> {calls}\necho >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out)}
    tests = "-q -n 3 tests/ops/test_cuda_scan.py tests/models/test_gpu.py::test_golden[cuda] -k 'not triton'"
    run = subprocess.run(["bash", str(SCRIPT), "--no-build", "--tests", tests, "--no-bench"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    pytest_calls = [ln for ln in calls.read_text().splitlines() if ln.startswith("[-m][pytest]")]
    assert len(pytest_calls) == 1, calls.read_text()
    assert pytest_calls[0].endswith("[-q][-n][3][tests/ops/test_cuda_scan.py][tests/models/test_gpu.py::test_golden[cuda]]"
                                     "[-k][not triton]"), pytest_calls[0]
