#!/usr/bin/env bash
# The study of docs/results.md: sweeps/seed_results.yaml (every forward process x K 10, 20 x 2
# seeds on the embedded MNIST digits, CPU), then its grouped table (printed, as pasted into
# docs/results.md) and its figures (into docs/figures/seed_results/). Rerunning it after an
# interruption trains only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m launchers run sweeps/seed_results.yaml --backend local
.venv/bin/python -m launchers table sweeps/seed_results.yaml --grouped --plot k --plot curves --plot samples
mkdir -p docs/figures/seed_results
cp runs/sweeps/seed_results/plots/{k,curves,samples}.png docs/figures/seed_results/
