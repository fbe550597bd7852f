#!/usr/bin/env bash
# Set up, then run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two workers: the SLURM/Ray cluster tests (one worker, in turn) beside the rest (tests/conftest.py).
exec .venv/bin/python -m pytest -q -n 2 "$@"
