"""The structure docs/ARCHITECTURE.md describes: no import cycles, dependencies that point one way,
an import that changes nothing, and a method that is one module plus one registry line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LIBRARY = REPO / "clipx"
# Applications and evaluators: the library's core (train, models, losses, methods) never imports
# them at module level; training reaches evaluation through a function-level call at evaluation time.
APPLICATIONS = ("eval", "data_prep", "clipx.apps", "clipx.cli")
CORE = ("clipx.train", "clipx.models", "clipx.losses", "clipx.methods", "clipx.data", "clipx.ssl", "clipx.templates")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of clipx (and application packages) that ``path`` imports when it is imported: the
    import statements at the top level of the file, not those inside functions."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from clipx.x import y` imports clipx.x, and clipx.x.y when y is a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in known or name.split(".")[0] in ("eval", "data_prep"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(LIBRARY.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): module_level_imports(f, known) for f in files}


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_core_imports_no_application_or_evaluator_at_module_level():
    """(``python -m clipx.train``'s ``__main__`` is the command line's entry point, an application.)"""
    offending = {module: sorted(i for i in imports if _within(i, APPLICATIONS))
                 for module, imports in import_graph().items()
                 if _within(module, CORE) and not module.endswith(".__main__")}
    assert {m: i for m, i in offending.items() if i} == {}


def test_config_is_the_bottom_layer():
    """config (and its file reading, config_io, and its rules, config_rules) imports nothing of clipx
    but its errors."""
    assert import_graph()["clipx.config"] <= {"clipx.errors", "clipx.config_io", "clipx.config_rules"}
    assert import_graph()["clipx.config_rules"] <= {"clipx.errors", "clipx.config_io"}
    assert import_graph()["clipx.config_io"] <= {"clipx.errors"}


def test_importing_clipx_changes_nothing_in_the_process():
    # open_clip sets TORCHINDUCTOR_CACHE_DIR and TOKENIZERS_PARALLELISM when imported: that is its own
    # doing, so the third-party libraries are imported before the snapshot.
    check = ("import os, open_clip, transformers, accelerate, webdataset; before = dict(os.environ); "
             "import clipx, clipx.methods, clipx.train.loop, clipx.api; "
             "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
             "assert 'HF_HUB_OFFLINE' not in os.environ; print('clean')")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-2000:]


ADD_A_METHOD = """
import json, sys
from clipx.config import load_config
from clipx.methods import METHODS
from clipx.train.host_memory import retain_freed_host_memory
from clipx.train.loop import train
from tests.example_method import PairCosine


def returned_on_free(megabytes=24):
    # Resident memory that freeing a 24 MB block gives back to the kernel: all of it with glibc's
    # default thresholds (the block is an mmap, unmapped on free); none while clipx's malloc tuning
    # holds (the block stays in the heap for reuse).
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    block = b"x" * (megabytes * 2**20)
    holding = rss()
    del block
    return (holding - rss()) / 2**20


METHODS.register("pair_cosine")(PairCosine())  # the one registry line
summary = train(load_config(None, sys.argv[1:]))  # train.retain_host_memory is on by default
# Three probes each: another thread of the process (the run's leftovers) may allocate or free
# between a probe's two readings; the test reads the best of three, and a tuning that held or was
# not undone shows in all of them.
after_run = [returned_on_free() for _ in range(3)]
retain_freed_host_memory()
print(json.dumps({"steps": summary["steps"], "final_loss": summary["final_loss"],
                  "returned_mb_after_run": after_run, "returned_mb_while_tuned": [returned_on_free() for _ in range(3)]}))
"""


@pytest.fixture(scope="module")
def toy_method_run(tmp_path_factory, digits_dir, tiny_model_json) -> dict:
    """A method that is one test module plus one registry line, trained for 2 steps in a fresh process."""
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(digits_dir, tiny_model_json, tmp_path_factory.mktemp("toy") / "run", **{
        "loss.name": "pair_cosine", "train.steps": 2, "data.workers": 0, "data.val": "null",
        "train.batch_size": 16})
    result = subprocess.run([sys.executable, "-c", ADD_A_METHOD, *overrides], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_new_method_is_one_module_and_one_registry_line(toy_method_run):
    assert toy_method_run["steps"] == 2 and 0.0 <= toy_method_run["final_loss"] <= 2.0  # 1 - cosine of unit vectors


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_malloc_tuning_ends_with_the_run(toy_method_run):
    """train.retain_host_memory tunes glibc's malloc for the run only: afterwards a freed block goes
    back to the kernel again, which it does not while the tuning holds."""
    probes = {k: toy_method_run[k] for k in ("returned_mb_while_tuned", "returned_mb_after_run")}
    assert min(toy_method_run["returned_mb_while_tuned"]) < 4, probes  # the probe sees the tuning when it is there
    assert max(toy_method_run["returned_mb_after_run"]) > 16, probes
