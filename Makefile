# make demo: run the proxy with an embedded broker and a simulated market.
# make test: run the whole test suite against a real (embedded) broker.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak clean system-packages

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kafka-reverse-proxy --demo

# The browser test drives Debian's Chromium, the unit test runs systemd-analyze and the scale-out
# test and benchmark put Debian's nginx in front of three proxies; install them from Debian when
# they are missing (needs root, as on CI; otherwise say what to install). nginx lives in /usr/sbin.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
		else \
			echo "make test and make bench need Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q tests

bench: $(STAMP) system-packages
	$(BIN)/python bench/run.py

# 2,000 SockJS sessions on three transports for 60 s of live traffic (about 2 minutes).
soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info
