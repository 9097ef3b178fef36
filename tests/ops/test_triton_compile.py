"""Every Triton kernel launch of the scan and the CGM gate compiles for sm_90 (H100), on CPU CI:
the interpreter runs code the compiler rejects (benchmarks/compile_offline.py says which)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(600)
def test_every_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_offline.py"), "--arch", "90"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=580)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 failed" in r.stdout and "distinct launches recorded" in r.stdout, r.stdout[-2000:]
