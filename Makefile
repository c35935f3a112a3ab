# Developer entry points. `make test` and `make demo` are the two set-up commands of the README:
# each creates or reuses .venv, installs torch and the dependencies, builds the package, then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_VENV ?= $(HOME)/.cache/fisher_fast/cuda-venv
CUDA_ARCHS ?= 8.0;9.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fisher_fast_deps
REGISTERED := $(VENV)/.fisher_fast_registered

.PHONY: venv build test demo lint format bench peers cuda-check timm-check cmake-check clean

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# The package is registered once (editable, without compiling); the library is then compiled in
# place by ninja, incrementally: an unchanged tree rebuilds nothing, a changed file rebuilds only
# what depends on it, and every compile step is printed as it runs.
$(REGISTERED): $(STAMP) pyproject.toml
	FISHER_FAST_EXTENSION=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(REGISTERED)

build: $(REGISTERED)
	$(PY) setup.py -q build_ext --inplace

test: build
	bash scripts/run_pytest.sh $(PY) tests

# The main job: Algorithm 1 on the embedded digits (fisher-fast demo; report in runs/demo).
demo: build
	$(PY) -m fisher_fast.cli demo

lint: $(STAMP)
	$(VENV)/bin/ruff check fisher_fast tests benchmarks scripts setup.py
	$(VENV)/bin/ruff format --check fisher_fast tests benchmarks scripts setup.py
	$(VENV)/bin/mypy fisher_fast
	find csrc examples -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs $(VENV)/bin/clang-format --dry-run --Werror

format: $(STAMP)
	$(VENV)/bin/ruff format fisher_fast tests benchmarks scripts setup.py
	$(VENV)/bin/ruff check --fix fisher_fast tests benchmarks scripts setup.py
	find csrc examples -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs $(VENV)/bin/clang-format -i

# Peer libraries for the benchmarks, installed without their dependencies so that they do not
# replace the CPU torch with a CUDA build (they pull torchvision, which is not needed here).
peers: build
	$(PY) -m pip install -q --no-deps -r benchmarks/requirements-peers.txt

bench: peers
	bash scripts/run_pytest.sh $(PY) benchmarks --benchmark-only

# Compiles the CUDA kernels against a CUDA build of torch in its own cached venv outside the repo.
cuda-check:
	bash scripts/cuda_compile_check.sh "$(CUDA_VENV)" "$(CUDA_TORCH_SPEC)" "$(CUDA_ARCHS)"

# The timm real-model tests and the Triton kernel's tests, in the same second environment (timm's
# torchvision does not import beside the main environment's CPU torch, and the CPU torch ships
# no Triton); on the CPU, the Triton kernel through Triton's interpreter.
timm-check:
	bash scripts/timm_check.sh "$(CUDA_VENV)" "$(CUDA_TORCH_SPEC)"

# Configures and builds the C++ library and its example with CMake, then runs the example.
cmake-check: build
	bash scripts/cmake_check.sh $(PY)

clean:
	rm -rf build fisher_fast/_C*.so *.egg-info .pytest_cache
