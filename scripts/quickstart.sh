#!/usr/bin/env bash
# Set up, then the main job on the embedded MNIST digits (no download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/quickstart
.venv/bin/python sample.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/quickstart --batch_size=16
