#!/usr/bin/env bash
# Install what the tests need and run the whole suite (CPU is enough; GPU tests skip cleanly).
# torch is installed only when missing, as the CPU build: an unpinned resolve pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q setuptools wheel
# No build isolation: the extension (built only where nvcc and a CUDA torch exist) must compile
# against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
# The whole run stays well inside CI's 90 minutes; each test has its own limit too.
exec timeout 75m "$PY" -m pytest -q --timeout=900 "$@"
