#!/usr/bin/env bash
# Run every benchmark once, in sequence; results land in bench/results/, then bench/summary.py
# rewrites the figures table of bench/README.md.
#
#   bash bench/run_all.sh                     # all of them
#   bash bench/run_all.sh sampling elbo       # some of them
#   QUICK=1 bash bench/run_all.sh             # smoke runs (--quick)
#   PYTHON=/elsewhere/.venv/bin/python bash bench/run_all.sh   # another interpreter (default .venv/bin/python)
#
# On a shared machine: LOCK=/tmp/lintrans-cpu.lock serialises each run with other users of that
# lock (flock), and MAX_LOAD=3 waits (up to WAIT_S, default 900 s) for the 1-minute load average
# to drop below 3 before each run, so that the figures measure the hardware, not the neighbours.
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(train_throughput bf16_heldout forward_processes sampling malloc elbo elbo_precision sweep_overhead ddp_scaling step_variants)
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=("${ALL[@]}")
extra=()
[[ -n "${QUICK:-}" ]] && extra+=(--quick)
status=0
for name in "${names[@]}"; do
  if [[ -n "${MAX_LOAD:-}" ]]; then
    waited=0
    while awk -v max="$MAX_LOAD" '{ exit !($1 >= max) }' /proc/loadavg && [[ $waited -lt ${WAIT_S:-900} ]]; do
      sleep 15
      waited=$((waited + 15))
    done
  fi
  echo "== $name ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
  cmd=("${PYTHON:-.venv/bin/python}" "bench/$name.py" "${extra[@]}")
  if [[ -n "${LOCK:-}" ]]; then
    cmd=(flock "$LOCK" "${cmd[@]}")
  fi
  "${cmd[@]}" || { echo "!! $name failed"; status=1; }
done
"${PYTHON:-.venv/bin/python}" bench/summary.py || status=1
exit $status
