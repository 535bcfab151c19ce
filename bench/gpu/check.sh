#!/usr/bin/env bash
# The GPU check: the training benchmark (ours, TRL's best packing, HF padded; LoRA and full) and the
# CUDA-only tests, on a lent GPU machine, in one call that fits the lease.
#   on the device (device tool, carry [".gpu"], after `make gpu-bundle` here; timeout_s 540):
#       bash bench/gpu/check.sh
#   dry run on a CPU (CI runs it: tests/test_gpu_check.py), the same steps on a tiny Llama built from a config:
#       GPU_CHECK_DRY=1 OUT=/tmp/gpu-dry bash bench/gpu/check.sh
# Every step has its own time limit and writes its results as it finishes (the benchmark: after every row),
# so a lease that ends early still returns what was measured. Plain python (no make: the device may lack it).
# The device tool brings back at most 8 files from $OUT, so the logs and JSON files (about 20) are written to
# a work folder and packed into $OUT/gpu-check.tgz after every step; $OUT also gets steps.txt and device.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
RAW="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"; trap 'rm -rf "$RAW"' EXIT
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
pack() {  # everything so far into one archive, replaced whole (a lease cut mid-pack keeps the previous one)
  cp "$RAW/steps.txt" "$RAW/device.txt" "$OUT/" 2>/dev/null
  tar -czf "$OUT/.gpu-check.tgz" -C "$RAW" . && mv -f "$OUT/.gpu-check.tgz" "$OUT/gpu-check.tgz"
}
BUDGET="${GPU_CHECK_BUDGET_S:-480}"  # the whole call, so a 540 s device call always returns
step() {  # name, seconds, command...: runs under min(seconds, what is left of BUDGET), logs to <work folder>/<name>.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "$name skipped: ${left}s left of ${BUDGET}s" | tee -a "$RAW/steps.txt"; pack; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RAW/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$RAW/steps.txt"
  tail -12 "$RAW/$name.log"
  [ "$rc" -eq 0 ] || status=1
  pack
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  echo "dry run on CPU: $(nproc) cores" | tee "$RAW/device.txt"
  DEVICE=cpu; MODEL=tiny; ROW_TIMEOUT=60
  PY="${PYTHON:-.venv/bin/python}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RAW/device.txt"
  # as the device tool's README says: into a folder of our own, ahead of the image's packages (its venv may be
  # read-only; the image's torch, transformers and accelerate stay as they are)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl >"$RAW/install.log" 2>&1 || { tail -5 "$RAW/install.log"; pack; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export LLM_FINETUNE_TEST_TOKENIZER="$PWD/.gpu/tokenizer"
  DEVICE=cuda; MODEL=1b; ROW_TIMEOUT=75
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" || { pack; exit 1; }
fi
"$PY" -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" 2>&1 \
  | tail -1 | tee -a "$RAW/device.txt"
pack

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
  --row-timeout "$ROW_TIMEOUT" --out "$RAW"
# 4. 8B-shape LoRA with activation checkpointing: peak memory against an 80 GB card
if [ "$DEVICE" = cuda ]; then
  step bench-8b 90 "$PY" -m bench.train_speed --device cuda --model 8b --methods lora --systems ours \
    --gradient-checkpointing --row-timeout 85 --out "$RAW"
fi
# 5. full fine-tuning (MFU), if time is left
step bench-full 160 "$PY" -m bench.train_speed --device "$DEVICE" --model "$MODEL" --methods full --systems ours,trl_best \
  --row-timeout "$ROW_TIMEOUT" --out "$RAW"
pack
ls -la "$RAW" "$OUT"
exit $status
