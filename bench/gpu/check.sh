#!/usr/bin/env bash
# The GPU check: the training benchmark (ours, TRL's best packing, HF padded; LoRA and full) and the
# CUDA-only tests, on a lent GPU machine, in one call that fits the lease.
#   on the device (device tool, carry [".gpu"], after `make gpu-bundle` here; timeout_s 540):
#       bash bench/gpu/check.sh
#   dry run on a CPU (CI runs it: tests/test_gpu_check.py), the same steps on a tiny Llama built from a config:
#       GPU_CHECK_DRY=1 OUT=/tmp/gpu-dry bash bench/gpu/check.sh
# Every step has its own time limit and writes its results as it finishes (the benchmark: after every row),
# so a lease that ends early still returns what was measured. Plain python (no make: the device may lack it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
BUDGET="${GPU_CHECK_BUDGET_S:-480}"  # the whole call, so a 540 s device call always returns
step() {  # name, seconds, command...: runs under min(seconds, what is left of BUDGET), logs to $OUT/<name>.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "$name skipped: ${left}s left of ${BUDGET}s" | tee -a "$OUT/steps.txt"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  tail -12 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  echo "dry run on CPU: $(nproc) cores" | tee "$OUT/device.txt"
  DEVICE=cpu; MODEL=tiny; ROW_TIMEOUT=60
  PY="${PYTHON:-.venv/bin/python}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  "$PY" -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -3
  export LLM_FINETUNE_TEST_TOKENIZER="$PWD/.gpu/tokenizer"
  DEVICE=cuda; MODEL=1b; ROW_TIMEOUT=75
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" || exit 1
fi
"$PY" -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee -a "$OUT/device.txt"

# Steps in value order, each under its own limit and all within BUDGET (later ones shrink or are skipped):
# 1. flex probe (20 s): flex attention forward + backward on this device, or why not
if [ "$DEVICE" = cuda ]; then
  step flex-probe 45 "$PY" -c "
import torch
from torch.nn.attention.flex_attention import flex_attention
print('capability', torch.cuda.get_device_capability())
q, k, v = (torch.randn(1, 4, 256, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
flex_attention(q, k, v).sum().backward()
print('flex attention forward + backward: ok')"
fi
# 2. the CUDA-only tests (-m gpu) of the two files that hold them (collecting every module would import
#    packages the device lacks: flytekit, deepspeed, llama.cpp); on CPU: that they collect
if [ "$DEVICE" = cuda ]; then
  step test-gpu 100 "$PY" -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_packing.py
else
  step test-gpu 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_packing.py
fi
# 3. 1B-class LoRA: ours (the train task's step), TRL's best, the padded Trainer; a JSON after every row
step bench-lora 230 "$PY" -m bench.train_speed --device "$DEVICE" --model "$MODEL" --methods lora \
  --row-timeout "$ROW_TIMEOUT" --out "$OUT"
# 4. 8B-shape LoRA with activation checkpointing: peak memory against an 80 GB card
if [ "$DEVICE" = cuda ]; then
  step bench-8b 90 "$PY" -m bench.train_speed --device cuda --model 8b --methods lora --systems ours \
    --gradient-checkpointing --row-timeout 85 --out "$OUT"
fi
# 5. full fine-tuning (MFU), if time is left
step bench-full 160 "$PY" -m bench.train_speed --device "$DEVICE" --model "$MODEL" --methods full --systems ours,trl_best \
  --row-timeout "$ROW_TIMEOUT" --out "$OUT"
ls -la "$OUT"
exit $status
