#!/usr/bin/env bash
# Install vmambax, then run the main job on its embedded default: `vmambax demo` makes synthetic
# PET-CT data, trains the full model briefly, evaluates it and writes figures and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m vmambax demo "$@"
