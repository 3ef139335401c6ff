# The two commands: `make demo` and `make test`. Both build or update the virtualenv, install
# the project, fetch the Kafka jars from Maven Central (once, cached), and run. Re-running
# is fast: the install step is skipped while pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench model clean

$(STAMP): pyproject.toml
	@echo ">> creating/updating $(VENV) (first run downloads TensorFlow: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --progress-bar on --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)
	@$(VENV)/bin/tokenaudit kafka install

demo: setup
	@$(VENV)/bin/tokenaudit demo

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo ">> $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
