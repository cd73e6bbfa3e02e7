# The commands people type. Each creates the virtualenv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch pinned to the locally served CPU wheel in the dev environment only
TORCH  ?= torch==2.13.0

.PHONY: install test lint demo bench clean docs gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

# trains a small GPT-2 on CPU and shows the law emerge; `lawwatch demo --help` lists the knobs
demo: install
	$(VENV)/bin/lawwatch demo

lint: install
	$(VENV)/bin/ruff check lawwatch tests bench recipes docs/hooks.py
	$(VENV)/bin/ruff format --check lawwatch tests bench recipes docs/hooks.py

# the documentation site (README.md as its front page, docs/, BENCHMARKS.md) into site/;
# --strict: a broken link or anchor, or a page missing from the nav, fails the build
docs: install
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache

# bench_overhead --quick: ~1 min; BENCHMARKS.md's numbers come from the full run (no --quick)
bench: install
	$(PY) bench/bench_residual.py
	$(PY) bench/bench_overhead.py --quick

# what only a GPU shows (bench/gpu_check.py: the 1.1B and 7B shapes in bf16, mixed vs float64
# statistics, the snapshot against its forward, a Trainer run): at most ~8 minutes on one GPU,
# BENCHMARKS.md rows on stdout. Needs a CUDA build of torch (`make gpu-check TORCH=torch`, or
# VENV= an environment that has one); on a CPU, `$(PY) bench/gpu_check.py --device cpu --tiny`
gpu-check: install
	$(PY) bench/gpu_check.py --device cuda
