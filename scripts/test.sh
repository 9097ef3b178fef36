#!/usr/bin/env bash
# Install what the tests need and run the whole suite (CPU is enough; GPU tests skip cleanly).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# The whole run stays well inside CI's 90 minutes; each test has its own limit too.
exec timeout 75m "${PYTHON:-python3}" -m pytest -q --timeout=900 "$@"
