#!/usr/bin/env bash
# The GPU benchmarks, as one prepared script for a machine with a GPU (or, to test it, a CPU):
#
#   bash bench/gpu.sh                          # on a GPU machine: writes bench/results/gpu_<card>_*.{json,md}
#   bash bench/gpu.sh --device cpu --quick     # the same code paths on this machine's CPU, in seconds
#   IHDM_PATH=/path/to/ihdm bash bench/gpu.sh  # also lintrans vs IHDM's own step on the same card
#
# What it records, each through the real code (TrainStep, inference_network, sampling.reverse,
# train.py, evaluate.py), each step under its own time limit so that one slow step loses only itself:
#   1. the training step, IHDM's default MNIST config (42 M parameters) at IHDM's batch 128: img/s in
#      fp32 and bf16, eager and compiled (training.compile), the compile time, and the fraction of the
#      card's dense matmul peak measured in the same run (MFU) -> gpu_<card>_train
#   2. lintrans vs IHDM (IHDM_PATH): fp32 and auto (bf16, compiled on CUDA), 5 alternating rounds
#      -> gpu_<card>_vs_ihdm
#   3. sampling img/s at K = 20 and K = 200, fp32/bf16, eager/compiled -> gpu_<card>_sampling
#   4. the trainer and the ELBO end to end on the device: the mnist5k model trained 200 steps with the
#      defaults (auto precision, auto compile), then its ELBO in fp32 and in bf16 -> gpu_<card>_elbo_precision
#   5. NCCL DDP scaling where there is more than one GPU (bench/ddp_scaling.py under torchrun); with one
#      GPU it says so.
# Results go to bench/results/ (or --out DIR); the step timings are ratios within this run.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda quick=0 out=bench/results tarball="" compile=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out="$2"; shift 2 ;;
        --tar) tarball="$2"; shift 2 ;;  # also pack the results into this .tgz after every step
        --compile) compile="$2"; shift 2 ;;  # the variants timed: off,on (default), or off (--quick's default)
        *) echo "bench/gpu.sh: unknown argument '$1'; valid: --device cuda|cpu, --quick, --out DIR, --tar FILE, --compile off|on|off,on" >&2
           exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "bench/gpu.sh: --device '$device'; valid: cuda, cpu" >&2; exit 2 ;; esac
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1

if [ "$device" = cuda ]; then
    if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench/gpu.sh: CUDA is not available here; run with --device cpu to test the script" >&2
        exit 2
    fi
    card=$("$py" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_"))')
    gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
    card=cpu gpus=0
fi
tag="gpu_${card}"
mkdir -p "$out"
export LINTRANS_BENCH_RESULTS=$(cd "$out" && pwd)
failed=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit; a failure is recorded, not fatal
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
    [ -z "$tarball" ] || tar czf "$tarball" -C "$out" .
}

if [ $quick = 1 ]; then  # compiling takes minutes on 2 CPU cores: eager only unless --compile says otherwise
    compile=${compile:-off}
    train=(--config tests/configs/tiny.py --batch-size 8 --quick)
    samp=(--config tests/configs/tiny.py --quick)
    ihdm=(--quick --batch-size 8)
    elbo=(--quick)
else
    compile=${compile:-off,on}
    train=(--config configs/mnist/default_mnist_configs.py --batch-size 128 --steps 10 --breakdown-steps 2 --profile-steps 1)
    samp=(--K 20,200 --batch-sizes 256 --rounds 2)
    ihdm=(--batch-size 128 --rounds 5 --steps 5 --configs small_mnist,default_mnist)
    elbo=(--steps 200 --rounds 3)
fi

step train 200 "$py" bench/train_throughput.py --device "$device" --precisions no,bf16 --compile "$compile" \
    --name "${tag}_train" "${train[@]}"
if [ -n "${IHDM_PATH:-}" ]; then
    step vs_ihdm 150 "$py" bench/vs_ihdm.py --device "$device" --name "${tag}_vs_ihdm" "${ihdm[@]}"
else
    echo "== vs_ihdm: skipped (IHDM_PATH is not set)"
fi
step sampling 120 "$py" bench/sampling.py --device "$device" --precisions fp32,bf16 --compile "$compile" \
    --name "${tag}_sampling" "${samp[@]}"
step elbo_precision 110 "$py" bench/elbo_precision.py --device "$device" --name "${tag}_elbo_precision" "${elbo[@]}"
if [ "$gpus" -gt 1 ]; then
    step ddp_nccl 180 "$py" bench/ddp_scaling.py --gpus "$gpus" --procs "$gpus" --batch-size 128 --precision bf16 \
        --name "${tag}_ddp"
else
    echo "== ddp_nccl: skipped ($gpus GPU(s) here: NCCL DDP scaling needs at least 2)"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/gpu.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "bench/gpu.sh: all steps done; results: $out/${tag}_*"
