#!/usr/bin/env bash
# On a lent GPU machine (device tool, `carry: [".gpu"]`, after bench/gpu/bundle.sh here): the CUDA-only tests,
# then the GPU benchmark; logs and results go to $OUT. One call, about 10 minutes.
#   run: bash bench/gpu/check.sh        (timeout_s 540; the 8B LoRA row: GPU_CHECK_8B=1)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -3
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/device.txt"
export LLM_FINETUNE_TEST_TOKENIZER="$PWD/.gpu/tokenizer" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# make test-gpu's selection (-m gpu), on the two files that hold it: collecting every test module would
# import flytekit, deepspeed and llama.cpp, which the device lacks
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" &&
  timeout 240 python3 -m pytest -v -m gpu tests/test_gpu.py tests/test_packing.py 2>&1 | tee "$OUT/test-gpu.log" | tail -25
timeout 300 make bench-gpu PYTHON=python3 2>&1 | tee "$OUT/bench-gpu.log" | tail -15
if [ -n "${GPU_CHECK_8B:-}" ]; then timeout 300 make bench-gpu-8b PYTHON=python3 2>&1 | tee "$OUT/bench-gpu-8b.log" | tail -8; fi
cp bench/results/*cuda*.json "$OUT/" 2>/dev/null || true
ls -la "$OUT"
