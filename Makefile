# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SRC    := $(shell find lbtwist twisted plugins -name '*.py' -o -name '*.yaml' -o -name 'setup.cfg' 2>/dev/null)

.PHONY: run test quick bench clean system-deps

run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= --reactor=lbtwist-lean lbtwist --config etc/lbtwist.yaml

test: system-deps $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Tools the tests drive for real: openssl s_client (TLS), headless Chromium (dashboard),
# ss from iproute2 (a listen socket's backlog, tests/test_flood_real.py), testssl.sh (the TLS listener's scan, a slow test),
# redis-server (fleet state), keepalived (the HA pair's VIP), h2load from nghttp2-client (HTTP/2), haproxy (comparisons).
DEBS := openssl chromium iproute2 testssl.sh redis-server keepalived nghttp2-client haproxy
system-deps:
	@for c in openssl chromium ss testssl redis-server keepalived h2load haproxy; do command -v $$c >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null; \
	  else echo "make test needs: sudo apt-get install -y $(DEBS)" >&2; exit 1; fi; }

quick: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Non-editable installs: twistd cannot see the dropin through PEP 660 editable hooks.
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml $(SRC)
	$(BIN)/pip install -q '.[dev,drill]' ./plugins/lbtwist-example
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
