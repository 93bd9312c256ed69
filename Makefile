# `make demo` and `make test` work on a fresh clone: the first use creates .venv with everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: install test demo lint bench clean

install: $(STAMP)

# Re-installs only when the package's requirements change.
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m ruff check cpt_jax configs tests benchmarks
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: install
	$(PY) -m cpt_jax.demo --workdir demo_out

lint: install
	$(PY) -m ruff check cpt_jax configs tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
