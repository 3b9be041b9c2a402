#!/bin/bash
# The GPU call that produced benchmarks/results/seed_sweep.jsonl (call 1; call 2 = the same with
#   --tasks parity,binary_copy,cumsum,s3_product --recipe poly-helper=... only, PREFLIGHT=0 SEEDS=0-3 BUDGET=185).
# Staging, from the repo root: .sweep/src/{hf_iterheads,benchmarks/seed_sweep.py} copied from this tree, and
# .sweep/whl/ holding the wheels the GPU image lacks (datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19,
# fsspec 2026.9.0: pip download --no-deps --only-binary=:all: --python-version 3.12 ...). Run: bash benchmarks/seed_sweep_gpu.sh
# (OUT = where results go). 16 runs share the GPU through CUDA MPS when nvidia-cuda-mps-control exists.
# Device sweep: default recipe x 5 tasks x seeds 0-9 first, then candidates, inside BUDGET seconds.
set -u
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORKERS=${WORKERS:-16}; CUDA_WORKERS=${CUDA_WORKERS:-16}; BUDGET=${BUDGET:-540}; TRAIN_FLAGS=${TRAIN_FLAGS:-}; SEEDS=${SEEDS:-0-9}
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ${WHEELS:-.sweep/whl/*.whl} || exit 3
export PYTHONPATH=$SITE:$PWD/.sweep/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cpus $(nproc)"; } > "$OUT/card.txt" 2>&1
python3 -c "import torch,transformers,accelerate,datasets,pyarrow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" >> "$OUT/card.txt" 2>&1
python3 -c "import hf_iterheads.cli" >> "$OUT/card.txt" 2>&1 || { cat "$OUT/card.txt"; exit 4; }
MPS=0
if [ "$CUDA_WORKERS" -gt 0 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1 && [ "${NO_MPS:-0}" = 0 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if timeout 20 nvidia-cuda-mps-control -d && timeout 40 python3 -c "import torch; print(torch.zeros(1, device='cuda').sum().item())"; then MPS=1
  else echo quit | timeout 10 nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
fi
echo "mps $MPS" >> "$OUT/card.txt"
# preflight: 40 steps on the GPU with the real model; if it breaks, the sweep runs on the CPUs
preflight() { rm -rf /tmp/preflight; (cd .sweep/src && timeout 90 python3 -m hf_iterheads.cli train --task polynomial --output-dir /tmp/preflight --max-steps 200 --eval-every 100 --threads 1 $TRAIN_FLAGS) > "$OUT/preflight.log" 2>&1; }
if [ "$CUDA_WORKERS" -gt 0 ]; then
  P0=$(date +%s)
  if ! preflight && [ $MPS = 1 ]; then
    echo "preflight failed under MPS: without it" >> "$OUT/card.txt"; echo quit | timeout 10 nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; MPS=0; preflight || { echo "preflight failed: CPU only" >> "$OUT/card.txt"; CUDA_WORKERS=0; }
  elif [ $MPS = 0 ] && ! grep -q "attn1 peakiness" "$OUT/preflight.log"; then echo "preflight failed: CPU only" >> "$OUT/card.txt"; CUDA_WORKERS=0; fi
  echo "preflight 200 steps $(( $(date +%s) - P0 )) s (mps $MPS)" >> "$OUT/card.txt"
fi
cat "$OUT/card.txt"
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
python3 .sweep/src/benchmarks/seed_sweep.py --seeds "$SEEDS" --workers "$WORKERS" --cuda-workers "$CUDA_WORKERS" --deadline "$LEFT" \
  --skip-unfinishable --jsonl "$OUT/seed_sweep.jsonl" --runs-dir /tmp/runs --pack "$OUT/runs.tar.gz" --train-flags "$TRAIN_FLAGS" \
  --recipe 'default=' \
  --recipe 'poly-helper:parity,binary_copy=--curriculum binary_copy:0.5:3000,polynomial:0.3:0 --stop-when-solved' \
  --recipe 'beta2-0.98:polynomial,cumsum,s3_product,parity,binary_copy=--betas 0.9,0.98 --stop-when-solved' \
  --recipe "single-task:parity,polynomial,cumsum,s3_product=--curriculum '' --stop-when-solved" \
  2>&1 | tr '\r' '\n' | grep -v '^train:\|^runs:' > "$OUT/sweep.log"
[ $MPS = 1 ] && echo quit | timeout 10 nvidia-cuda-mps-control
echo "total $(( $(date +%s) - T0 )) s"; tail -5 "$OUT/sweep.log"; wc -l "$OUT/seed_sweep.jsonl"
