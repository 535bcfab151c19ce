#!/usr/bin/env sh
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), taken from
# the llama-cpp-python source release pinned in pyproject.toml: the same llama.cpp commit that quantizes the
# files (llama_model_quantize) and runs them (gguf_eval). With it come the reference vocabularies
# (models/ggml-vocab-*.gguf with their .inp/.out tokenization cases) and real chat templates that the
# round-trip tests use. Used by `make setup` (into .cache/llama.cpp) and by the images (into /opt/llama.cpp).
#   sh images/fetch_llama_cpp.sh [DEST]     PIP=... to pick the pip
set -eu
DEST="${1:-.cache/llama.cpp}"
VERSION=0.3.36
PIP="${PIP:-pip}"
if [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$VERSION" ]; then exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
src="llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -rf "$DEST" && mkdir -p "$DEST"
tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$DEST" --strip-components=3 --wildcards \
  "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py/gguf" "$src/LICENSE" "$src/models/templates" \
  "$src/models/ggml-vocab-llama-bpe.gguf*" "$src/models/ggml-vocab-qwen2.gguf*" "$src/models/ggml-vocab-phi-3.gguf*" \
  "$src/models/ggml-vocab-llama-spm.gguf*"
echo "$VERSION" > "$DEST/VERSION"
echo "llama.cpp converter (llama-cpp-python $VERSION) in $DEST"
