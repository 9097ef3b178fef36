#!/usr/bin/env bash
# Install vmambax into the current Python: `bash scripts/install.sh [EXTRAS]` (e.g. test).
# torch is installed only when missing, as the CPU build 2.13.0: an unpinned resolve pulls a
# multi-GB CUDA build. On a GPU machine install your CUDA torch first; the extension then builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q setuptools wheel
# No build isolation: the extension (built only where nvcc and a CUDA torch exist) must compile
# against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e ".${1:+[$1]}"
