# `make demo` and `make test` are all a fresh machine needs: each creates .venv and installs the
# project (torch and torchvision resolve to the builds on this machine's disk) before it runs.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

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
	$(VENV)/bin/python -m pip install --quiet -e '.[bench]'
	bash eval/bench/openclip_env.sh
	$(VENV)/bin/python eval/bench/perf.py
	$(VENV)/bin/python eval/bench/perf.py --markdown runs/bench/results.json --plot eval/bench/plots/scaling.png

# pytest exits 5 when it collected no tests: a missing suite must fail loudly, not pass quietly.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

clean:
	rm -rf runs build *.egg-info
