#!/usr/bin/env bash
# The dry run under the lent GPU machine's package versions, on CPU, before a lease: the device image has older
# torch/transformers than our lock (device tool, KINDS.md: torch 2.11.0+cu130, transformers 5.17.0, accelerate
# 1.15.0, Python 3.12), and check.sh adds only what .gpu/ carries. An API our code or TRL uses that the older
# versions lack would otherwise first show on the device, with the lease running.
#   bash bench/gpu/device_versions.sh        (about 5 GB of downloads the first time: PyPI's torch 2.11 is a CUDA
#                                             build, which runs on the CPU; then ~2 min for the dry run and tests)
# Python here is 3.11, not the device's 3.12, so the bundle is built again for 3.11, at the same versions.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${DEVICE_VENV:-/tmp/device-versions}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 \
    safetensors==0.8.0 tokenizers==0.23.2 "numpy<2.5" pandas pyarrow pytest pyyaml jinja2 psutil scipy \
    mypy-extensions xxhash fsspec filelock requests tqdm
fi
# the GPU bundle, for this machine's Python, then installed as check.sh installs it on the device
BUNDLE_DIR="$VENV-bundle" BUNDLE_PYTHON="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
  bash bench/gpu/bundle.sh
rm -rf "$VENV-site"
"$VENV/bin/pip" install -q --no-index --no-deps --no-compile --upgrade --target "$VENV-site" "$VENV-bundle"/wheels/*.whl
export PYTHONPATH="$VENV-site" LLM_FINETUNE_TEST_TOKENIZER="$VENV-bundle/tokenizer"
out="${OUT:-/tmp/device-versions-out}"; rm -rf "$out"
GPU_CHECK_DRY=1 OUT="$out" PYTHON="$VENV/bin/python" bash bench/gpu/check.sh
# the GPU test files' CPU tests, under the same versions (their CUDA tests skip here)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_packing.py \
  tests/test_attention_dtype.py tests/test_precision_choice.py tests/test_label_loss.py
