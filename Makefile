# `make demo` and `make test` are all a fresh machine needs: each creates .venv and installs the
# project (torch and torchvision resolve to the builds on this machine's disk) before it runs.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipx demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf runs build *.egg-info
