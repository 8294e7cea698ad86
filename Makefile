# galaxy_lightning: common tasks. `make help` lists them.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: help install install-browser test test-fast quickstart preview tensorboard bench bench-models bench-recipe clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## install torch 2.13.0 (CPU wheel here) first, then the project (editable) with test tools
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

install-browser:  ## Debian's chromium for the report and serving-page tests (root, or sudo; once per machine)
	command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }

test:  ## the whole test suite, slow end-to-end tests included (what CI runs); the 25 slowest listed
	$(PYTHON) -m pytest -m "slow or not slow" --durations=25

test-fast:  ## the fast suite only (the tests not marked slow)
	$(PYTHON) -m pytest

quickstart:  ## a short run on simulated galaxies, every output of a full run
	$(PYTHON) train.py experiment=quickstart

preview:  ## write synthetic_examples.png: 8 simulated galaxies per class
	$(PYTHON) -m galaxy_lightning.data.synthetic --out synthetic_examples.png

tensorboard:  ## dashboards of every run under logs/
	tensorboard --logdir logs

clean:  ## remove run outputs (logs/), keep data/
	rm -rf logs outputs multirun .pytest_cache

bench:  ## the benchmark: tutorial loop vs train.py (float32 and perf=fast), models, recipe profile, data preparation
	$(PYTHON) -m galaxy_lightning.bench

bench-recipe:  ## where the time of a recommended run goes (a profiled 800-step run, projected to its full length)
	$(PYTHON) -m galaxy_lightning.bench --only-recipe

bench-models:  ## ms/step and parameters of every model in the recommended recipe (float32, fast)
	$(PYTHON) -m galaxy_lightning.bench --only-models
