# The two commands: `make demo` and `make test`. Both build or update the virtualenv, install
# the project, fetch the Kafka jars from Maven Central (once, cached), and run. Re-running
# is fast: the install step is skipped while pyproject.toml is unchanged. The Apicurio schema
# registry is fetched the same way; the tests start one and run `tokenaudit schemas check` on it.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench docs clean vendor-charts

$(STAMP): pyproject.toml setup.py schemas/_native.pyx streams/_fastjson.pyx
	@echo ">> creating/updating $(VENV) (first run downloads TensorFlow: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --progress-bar on --disable-pip-version-check -e '.[test]' 2>&1 \
	  | grep -vE '^(Requirement already satisfied|  |\s*$$)' || true
	@$(PY) -c "import tokenaudit.settings, tensorflow, faust, chdb" 2>/dev/null \
	  || { echo "install incomplete: see the pip output above"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)
	@$(VENV)/bin/tokenaudit kafka install
	@$(VENV)/bin/tokenaudit registry install
	@# promtool checks infra/alerts/ in the tests; Debian's prometheus package ships it
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> installing promtool (apt-get install prometheus)"; \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
	    || echo "!! could not install promtool: tests/test_alerts.py will fail until it is on PATH"; \
	  else echo "!! promtool missing: install it (apt-get install prometheus) for tests/test_alerts.py"; fi; }
	@# the dashboard's browser tests drive Debian's chromium through its chromedriver
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> installing chromium and chromium-driver (apt-get)"; \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
	    || echo "!! could not install chromium: the browser tests (marker browser) will be skipped"; \
	  else echo "!! chromium/chromedriver missing: apt-get install chromium chromium-driver for the browser tests"; fi; }

demo: setup
	@$(VENV)/bin/tokenaudit demo

test: setup lint
	@$(PY) -m pytest $(PYTEST_ARGS)

# The tests that need no broker, store, model, browser or cluster (markers in pyproject.toml):
# a minute, for the edit-test loop. `make test` runs everything.
test-fast: $(STAMP)
	@$(PY) -m pytest -m "not (broker or store or model or browser or chaos or cluster)" $(PYTEST_ARGS)

# ruff (lint and format), mypy and import-linter, all pinned in the test extra. mypy and
# import-linter see the package as installed (tokenaudit.inference, ...), which is assembled
# from the top-level rooms: build/lint/tokenaudit is that tree, made of symbolic links.
ROOMS := inference schemas streams sinks reports infra
LINT_TREE := build/lint
lint: $(STAMP)
	@mkdir -p $(LINT_TREE)/tokenaudit
	@for e in tokenaudit/* $(ROOMS); do ln -sfn "$$(pwd)/$$e" $(LINT_TREE)/tokenaudit/$$(basename $$e); done
	@echo ">> ruff check" && $(VENV)/bin/ruff check --quiet .
	@echo ">> ruff format --check" && $(VENV)/bin/ruff format --check --quiet .
	@echo ">> mypy" && cd $(LINT_TREE) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
	  --cache-dir $(CURDIR)/build/mypy_cache tokenaudit
	@echo ">> lint-imports" && cd $(LINT_TREE) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports --no-cache \
	  --config $(CURDIR)/pyproject.toml

bench: setup
	@for b in bench/bench_*.py; do echo ">> $$b"; $(PY) $$b || exit 1; done

docs: $(STAMP)
	@# every generated block of README.md, CONTRIBUTING.md and docs/*.md, and docs/models.md
	@$(PY) -m tokenaudit.docs_gen

# The dashboard's chart library, vendored (no CDN at run time): fetched from the npm registry at
# the pinned version, checked against the registry's integrity hash, with its licence.
CHARTJS_VERSION := 4.6.1
CHARTJS_INTEGRITY := sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g==
VENDOR := reports/dashboard_assets/vendor
vendor-charts:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	curl -sSfL -o "$$tmp/chart.tgz" https://registry.npmjs.org/chart.js/-/chart.js-$(CHARTJS_VERSION).tgz && \
	test "sha512-$$(openssl dgst -sha512 -binary "$$tmp/chart.tgz" | base64 -w0)" = "$(CHARTJS_INTEGRITY)" && \
	tar -xzf "$$tmp/chart.tgz" -C "$$tmp" package/dist/chart.umd.min.js package/LICENSE.md && \
	cp "$$tmp/package/dist/chart.umd.min.js" $(VENDOR)/chart.umd.min.js && \
	cp "$$tmp/package/LICENSE.md" $(VENDOR)/chart.js.LICENSE.md && \
	echo "chart.js $(CHARTJS_VERSION) $(CHARTJS_INTEGRITY)" > $(VENDOR)/VERSION && \
	echo ">> vendored chart.js $(CHARTJS_VERSION) into $(VENDOR)"

clean:
	rm -rf $(VENV) .pytest_cache
