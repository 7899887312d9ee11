# chatd: `make run` runs the daemon, `make test` runs every test. Both set up
# everything they need on a fresh machine (a venv in .venv, Debian's chromium,
# the Python 2.7 Autobahn|Testsuite in .cache).

VENV    ?= .venv
PY      := $(VENV)/bin/python
PORT    ?= 9000
ARGS    ?=
PYTHON3 ?= python3
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check fuzz lint format conformance bench bench-quick deps runtime-deps system-deps clean

# Two stamps in one venv: .runtime once the daemon's packages are in
# (requirements.txt: all `make run` needs), .deps once the test tools are too
# (requirements-dev.txt: everything else here).
$(PY):
	@$(PYTHON3) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "chatd needs Python 3.11+ (set PYTHON3=...)")'
	$(PYTHON3) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.deps: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps
runtime-deps: $(VENV)/.runtime

# Debian packages the tests use: chromium (the page), systemd (unit checks, socket
# activation), redis-server (cluster tests start their own on free loopback ports),
# nodejs (chatd.js's tests: 20.10 or later, for its WebSocket; nothing from npm),
# an emoji and a Chinese font (the page's screenshots show reactions and the zh interface)
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v systemd-socket-activate >/dev/null || missing="$$missing systemd"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	fc-list : family 2>/dev/null | grep -q "Noto Color Emoji" || missing="$$missing fonts-noto-color-emoji"; \
	fc-list : family 2>/dev/null | grep -q "WenQuanYi Micro Hei" || missing="$$missing fonts-wqy-microhei"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

## run the daemon on its defaults: http://127.0.0.1:9000/ (PORT=..., ARGS="--interface 0.0.0.0")
run: runtime-deps
	PYTHONPATH=$(CURDIR) $(VENV)/bin/twistd -n --pidfile= chatd --port $(PORT) $(ARGS)

## every test: lint, unit, protocol, browser, packaging and the full Autobahn|Testsuite run
test: deps system-deps lint
	$(PY) -m pytest

## the same without the 9-minute conformance run
check: deps system-deps lint
	$(PY) -m pytest -m "not conformance"

## the property tests (tests/test_fuzz.py) with a large budget: about 5 minutes (CHATD_FUZZ_EXAMPLES=N per property)
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz.py --timeout 1200 --hypothesis-show-statistics

## the Autobahn|Testsuite alone; CASES="1.* 7.*" for a subset
conformance: deps
	$(PY) -m tools.conformance $(CASES)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache reports build dist *.egg-info .pytest_cache .ruff_cache

## benchmarks: they print numbers and assert nothing (bench.run: ~10 min, writes bench/RESULTS.md; bench.deflate: ~4 min, bench/RESULTS-deflate.md)
bench: deps
	$(PY) -m bench.run
	$(PY) -m bench.deflate
	$(PY) -m bench.chat
	$(PY) -m bench.cluster

## the fan-out comparison as a smoke run (under 3 minutes)
bench-quick: deps
	$(PY) -m bench.run --quick
