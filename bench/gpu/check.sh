#!/usr/bin/env bash
# The GPU check: the training benchmark (ours, TRL's best packing, HF padded; LoRA and full) and the
# CUDA-only tests, on a lent GPU machine, in one call that fits the lease.
#   on the device (device tool, carry [".gpu"], after `make gpu-bundle` here; timeout_s 540):
#       bash bench/gpu/check.sh
#   dry run on a CPU (CI runs it: tests/test_gpu_check.py), the same steps on a tiny Llama built from a config:
#       GPU_CHECK_DRY=1 OUT=/tmp/gpu-dry bash bench/gpu/check.sh
# Every step has its own time limit and writes its results as it finishes (the benchmark: after every row),
# so a lease that ends early still returns what was measured. Plain python (no make: the device may lack it).
# The 8B-class LoRA row: GPU_CHECK_8B=1 (about 3 more minutes).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
step() {  # name, seconds, command...: runs it under a time limit, logs to $OUT/<name>.log, records its exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc ${SECONDS}-${t0}s" | awk '{split($3,a,"-"); printf "%s %s %ds\n", $1, $2, a[1]-a[2]}' | tee -a "$OUT/steps.txt"
  tail -12 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  echo "dry run on CPU: $(nproc) cores" | tee "$OUT/device.txt"
  DEVICE=cpu; MODEL=tiny; ROW_TIMEOUT=120
  PY="${PYTHON:-.venv/bin/python}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  "$PY" -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -3
  export LLM_FINETUNE_TEST_TOKENIZER="$PWD/.gpu/tokenizer"
  DEVICE=cuda; MODEL=1b; ROW_TIMEOUT=100
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" || exit 1
fi
"$PY" -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee -a "$OUT/device.txt"

# 1. the numbers first: each row in its own process under ROW_TIMEOUT, the JSON rewritten after every row
step bench 420 "$PY" -m bench.train_speed --device "$DEVICE" --model "$MODEL" --row-timeout "$ROW_TIMEOUT" --out "$OUT"
# 2. the CUDA-only tests (-m gpu) of the two files that hold them (collecting every module would import
#    flytekit, deepspeed and llama.cpp, which the device lacks); on CPU: that they collect
if [ "$DEVICE" = cuda ]; then
  step test-gpu 150 "$PY" -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_packing.py
else
  step test-gpu 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_packing.py
fi
if [ -n "${GPU_CHECK_8B:-}" ] && [ "$DEVICE" = cuda ]; then
  step bench-8b 240 "$PY" -m bench.train_speed --device cuda --model 8b --methods lora --gradient-checkpointing \
    --row-timeout 150 --out "$OUT"
fi
ls -la "$OUT"
exit $status
