#!/usr/bin/env bash
# The GPU path's checks and timings, for a machine with a CUDA GPU and torch, torchvision, numpy, pyarrow and pytest
# (Ray is not needed: these are the plain-PyTorch layers that Ray workers given a GPU run).
#   bash scripts/gpu_check.sh [OUTDIR]
# 1. the GPU tests (skipped on CPU-only machines, so CI never runs them): KD, teacher training and soft labels on the
#    GPU against the CPU, GPU checkpoints resumed on the CPU, the shipped predictor scoring/adapting on the GPU;
# 2. bench_kd.py on the CPU and on the GPU, our space and the authors' 64x64 space, two batch sizes.
# Each benchmark's JSON goes to OUTDIR/bench_kd.jsonl (default: ./gpu_check).
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', torch.get_num_threads())"
rc=0
"$py" -m pytest -q -p no:cacheprovider "$root/tests/test_kd.py" "$root/tests/test_meta.py" 2>&1 | tee "$out/pytest.log" | tail -4 || rc=1
cd "$root/benchmarks"
threads=$("$py" -c "import os; print(min(16, os.cpu_count()))")
run() {
  echo "bench_kd.py $*"
  "$py" bench_kd.py --threads "$threads" "$@" 2>&1 | tail -1 | tee -a "$out/bench_kd.jsonl" || rc=1
}
run --device cpu --students 3 --train-per-class 200 --epochs 2
run --device cuda --students 3 --train-per-class 200 --epochs 2
run --device cuda --students 3 --train-per-class 200 --epochs 2 --batch-size 256
run --device cpu --space paper --students 2 --train-per-class 100 --epochs 1
run --device cuda --space paper --students 3 --train-per-class 200 --epochs 2
run --device cuda --space paper --students 3 --train-per-class 200 --epochs 2 --batch-size 256
exit $rc
