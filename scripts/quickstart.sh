#!/usr/bin/env bash
# Set up, then the main job: sweeps/quickstart.yaml (3 forward processes x 2 horizons on the
# embedded MNIST digits, CPU) through the local backend, ending in the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m launchers run sweeps/quickstart.yaml --backend local
