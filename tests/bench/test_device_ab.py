"""benchmarks/device_ab.sh: the order of the runs and the labels of their records, with stand-in
trees whose device_run.sh only reports how it was called."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_ab.sh"
STUB = '#!/usr/bin/env bash\necho "run $(basename "$(pwd)") out=$(basename "$OUT") commit=$VMAMBAX_COMMIT args=$*"\n'


def _tree(path: Path) -> Path:
    (path / "benchmarks").mkdir(parents=True)
    (path / "benchmarks" / "device_run.sh").write_text(STUB)
    return path


def _runs(a: Path, *args: str, env: dict) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT), *args], cwd=a, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.startswith("run ")]


def test_several_b_trees_each_built_tested_and_benchmarked(tmp_path):
    a = _tree(tmp_path / "a")
    (a / ".wheels").mkdir()
    _tree(a / "b1"), _tree(a / "b2")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "VMAMBAX_COMMIT_A": "base",
           "VMAMBAX_COMMIT_B": "c1,c2"}
    runs = _runs(a, "b1,b2", "--tests", "-m gpu t", "--bench", "bench.py --x", "--aba", env=env)
    assert runs == [
        "run a out=a commit=base args=--mamba --no-tests --bench bench.py --x",
        "run b1 out=b commit=c1 args=--tests -m gpu t --bench bench.py --x",
        "run b2 out=b2 commit=c2 args=--tests -m gpu t --bench bench.py --x",
        "run a out=a2 commit=base args=--no-build --no-tests --bench bench.py --x",
    ]
    assert (a / "b1" / ".wheels").is_symlink() and (a / "b2" / ".wheels").is_symlink()  # the peer's wheel


def test_one_b_tree_and_a_missing_one(tmp_path):
    a = _tree(tmp_path / "a")
    _tree(tmp_path / "b")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    assert _runs(a, "../b", env=env) == ["run a out=a commit=A args=--mamba --no-tests --no-bench",
                                         "run b out=b commit=B1 args=--no-tests --no-bench"]
    bad = subprocess.run(["bash", str(SCRIPT), "../b,../nope"], cwd=a, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no tree at ../nope" in bad.stdout
