# cedm: `make build-ext && pytest` builds the fused kernels and runs the tests.
PYTHON ?= python3
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: build-ext test test-fast bench gpu-check lint image clean

build-ext:  ## build cedm._C in place: CPU always, CUDA too when nvcc is found
	$(PYTHON) setup.py build_ext --inplace

test:
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not slow"

bench:  ## speed goals: ratios against baselines measured in the same run
	$(PYTHON) -m benchmarks

gpu-check:  ## on a CUDA machine: build, CUDA tests, opcheck, GPU timings; one table (+ $$OUT/gpu_check.md)
	$(PYTHON) -m benchmarks.gpu_check

lint:  ## ruff, mypy on the core modules, yamllint, hadolint (also run by .ci/run)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m yamllint -s k8s argo overlays
	hadolint docker/Dockerfile

VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= cedm
PYTORCH_TAG ?= 2.14.1-cuda13.0-cudnn9
image:  ## needs a Docker engine; tags the project version (the sweep's default image-tag)
	docker build -f docker/Dockerfile --build-arg PYTORCH_TAG=$(PYTORCH_TAG) -t $(IMAGE):$(VERSION) .

clean:
	rm -rf build cedm/*.so
