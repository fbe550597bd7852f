#!/usr/bin/env bash
# Set up a fresh machine: system packages (SLURM test cluster, Open MPI), the venv, lintrans.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash slurm/install_system_packages.sh
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import lintrans, torch, ml_collections, submitit, ray, cleanfid" 2>/dev/null \
   || [ requirements.txt -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  touch .venv/.installed
fi
echo "setup: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'), venv at .venv"
