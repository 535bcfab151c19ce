#!/usr/bin/env bash
# Builds .gpu/ (git-ignored): what a lent GPU machine lacks, small enough to travel with the working tree
# (the device tool sends at most 64 MiB): wheels for Python 3.12 / x86_64 at this project's locked versions,
# and the embedded model's tokenizer (its 98 MB GGUF cannot travel; the GPU tests build tiny models on it).
# Then on the device: bash bench/gpu/check.sh (see bench/NOTES.md, "GPU").
# BUNDLE_DIR / BUNDLE_PYTHON: another folder and Python version (bench/gpu/device_versions.sh: 3.11, this machine's).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${BUNDLE_DIR:-.gpu}"
rm -rf "$DIR" && mkdir -p "$DIR/wheels"
# missing from the device's image, and peft (the image has one, at a version KINDS.md does not give; ours is
# the one the dry run and CI test); its torch, transformers, accelerate, pandas and pyarrow stay as they are
pkgs=(trl datasets dill multiprocess pandera typeguard typing-inspect typing-inspection pydantic pydantic_core
      annotated-types sniffio pytz bitsandbytes peft)
pins=()
for p in "${pkgs[@]}"; do
  pins+=("$(grep -i -E "^${p//[-_]/[-_]}==" constraints.txt)")
done
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version "${BUNDLE_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$DIR/wheels" "${pins[@]}"
.venv/bin/python -c "from bench.common import embedded_model_dir; from llm_finetune.model import load_tokenizer; \
load_tokenizer(embedded_model_dir()).save_pretrained('$DIR/tokenizer')"
du -sh "$DIR"; git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "tracked files: %.1f MB\n", $1/1e6}'
