# Two commands for a new user: `make demo` and `make test`. Each builds .venv on first use.
# CPU machines: torch 2.14.1 with torchvision 0.29.1 (a CUDA build that runs on the CPU; pip on Python 3.11 takes
# both from this machine's disk), so the timm and torchvision students are tested. On a CUDA server with torch
# already installed, use
#   pip install -e '.[gpu,dev]'   (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

# nvidia-pytriton carries a real tritonserver (python backend) for the serving tests; --no-deps because the wheel
# pins numpy < 2 and only its binary is used

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,images]'
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

demo: $(BIN)/.installed
	$(BIN)/compress demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) compressed .pytest_cache
