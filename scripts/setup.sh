#!/usr/bin/env bash
# Set up a machine: the system packages of the SLURM/MPI test cluster (only where they are missing
# and this can install them: root with apt-get), the venv from requirements.txt (the lock), lintrans.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

skipped="skipped the system packages of the SLURM/MPI test cluster (slurm/install_system_packages.sh); training and local sweeps do not need them"
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash slurm/install_system_packages.sh
elif command -v dpkg-query >/dev/null 2>&1 && bash slurm/install_system_packages.sh >/dev/null 2>&1; then
  :  # not root (or no apt-get), but every package is already installed
elif [ "$(id -u)" -ne 0 ]; then
  echo "setup: not root: $skipped"
else
  echo "setup: no apt-get: $skipped"
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found="$("$python" -V 2>/dev/null || true)"
    echo "setup: lintrans needs Python >= 3.11; '$python' is ${found:-not a Python that runs here} (set PYTHON=python3.11)" >&2
    exit 2
  fi
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import lintrans, torch, ml_collections, submitit, ray, cleanfid, pydantic, mlflow, wandb" 2>/dev/null \
   || [ ! -x .venv/bin/lintrans ] || [ requirements.txt -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  touch .venv/.installed
fi
echo "setup: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'), venv at .venv"
