# `make demo` and `make test` are all a fresh machine needs: each creates .venv and installs the
# project (torch and torchvision resolve to the builds on this machine's disk) before it runs.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test install bench browser peers clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipx demo --out runs/demo

# clipx against open_clip's own trainer on the same work (BENCHMARKS.md). The peer's extra need,
# webdataset < 1.0, goes into runs/bench/openclip-site, seen only by the open_clip runs.
bench: $(STAMP)
	bash bench/openclip_env.sh
	$(VENV)/bin/python bench/perf.py
	$(VENV)/bin/python bench/perf.py --markdown runs/bench/results.json --plot bench/plots/scaling.png

# The report test renders a page in headless Chromium: Debian's package, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null || \
	    echo "make: could not install chromium (apt-get install chromium); the report test will fail" >&2

# CLIP_benchmark for the test that compares it with clipx eval (and open_clip_train for make bench):
# into runs/bench/openclip-site, outside clipx's own environment.
peers: $(STAMP)
	@test -d runs/bench/openclip-site/clip_benchmark || bash bench/openclip_env.sh

# Lint and type check first (seconds), then the tests. pytest exits 5 when it collected no tests:
# a missing suite must fail loudly, not pass quietly.
test: $(STAMP) browser peers
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	@$(VENV)/bin/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

clean:
	rm -rf runs build *.egg-info
