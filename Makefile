# The test command CI runs (.ci/run) and the README shows. It creates .venv on a fresh machine and reuses it after.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# torch and torchvision are pinned to the releases this machine keeps on disk; elsewhere pip resolves the same pins.
TORCH_PINS = torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all train summary clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Two test processes of one thread each (-n 2, whole files per process): tests that start tools or import torch in
# subprocesses overlap, and the two processes do not oversubscribe two cores.
TEST_ENV = HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
test: install
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

# Also the tests marked slow (torch.compile of full models and the like): about 5 minutes more.
test-all: install
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m ""

# The main job: train EfficientDet-Lite0 on the embedded synthetic dataset and print COCO AP (~4 min on 2 CPU cores).
train: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python tools/train.py $(ARGS)

summary: install
	$(VENV)/bin/python tools/summary.py model=efficientdet_d0

clean:
	rm -rf $(VENV) .pytest_cache
