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

# pytest exits 5 when it collected no tests: a missing suite must fail loudly, not pass quietly.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

clean:
	rm -rf runs build *.egg-info
