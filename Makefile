# `make demo` and `make test` work on a fresh clone and in either order: the first use creates .venv.
# `make demo` installs only the runtime dependencies (setup.py install_requires); the test extra
# (pytest, ruff, torch, transformers, ...) comes with `make test` (or `make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTING := $(VENV)/.test-installed
# Tests and benchmarks run on 8 fake CPU devices (sharding on one machine); the demo on the real ones.
FAKE_DEVICES := --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: install test demo lint bench clean

install: $(TESTING)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Each stamp re-installs only when the package's requirements change.
$(RUNTIME): setup.py constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(TESTING): $(RUNTIME) setup.py constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: export XLA_FLAGS ?= $(FAKE_DEVICES)
test: $(TESTING)
	$(PY) -m ruff check cpt_jax configs tests benchmarks
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15 tests

demo: $(RUNTIME)
	$(PY) -m cpt_jax.demo --workdir demo_out

lint: $(TESTING)
	$(PY) -m ruff check cpt_jax configs tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
