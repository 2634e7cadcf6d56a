"""The structure docs/ARCHITECTURE.md describes: no import cycles, dependencies that point one way
(the document's layer table, read from the document itself), an import that changes nothing, and a
method that is one module plus one registry line.

Every import counts, wherever it stands: one inside a function runs when the function does, and a
cycle or an upward reach through it is as real as at the top of the file."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("clipx", "eval", "data_prep")
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    return {module_name(f): f for package in PACKAGES for f in sorted((REPO / package).rglob("*.py"))}


def imported_modules(source: str, me: str, is_package: bool, known: set[str]) -> dict[str, int]:
    """{module of ``known``: line} for every import in module ``me`` (its ``source``): top level, in
    functions, relative or not; only those under ``if TYPE_CHECKING:``, which never run, are not counted.

    ``from a.b import c`` imports a.b.c when that is a module, else a.b; an imported name that is no
    module of ``known`` stands for the nearest package of it that is. Parent packages, which any
    import of a submodule runs first, are left out: a package and its modules would otherwise all
    form cycles."""
    package = me if is_package else me.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in run_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from this package, or level - 1 packages above it
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.setdefault(name, node.lineno)
    return found


def run_nodes(tree: ast.AST):
    """Every node of ``tree`` (as ast.walk) but the bodies of ``if TYPE_CHECKING:``, type checkers' only."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    return {module: imported_modules(path.read_text(), module, path.name == "__init__.py", set(files))
            for module, path in files.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk (none: the graph is acyclic)."""
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
    return cycles


def layer_table(text: str) -> list[tuple[str, list[str]]]:
    """(layer, path entries) of each row of the "## Layers" table, top row first. An entry is a path
    from the repository root in backquotes: a folder (ending in /) or a .py file, with {a,b} choices."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and its rule
    table = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        entries = []
        for entry in re.findall(r"`([^`]+)`", cells[1]):
            choices = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", entry)
            entries += ([choices[1] + c + choices[3] for c in choices[2].split(",")] if choices else [entry])
        table.append((cells[0], entries))
    return table


def layer_of(path: str, table: list[tuple[str, list[str]]]) -> list[int]:
    """Rows (0 = top) of the most specific entries naming ``path``: a file over its folder, a folder
    over the folders around it. One row: the module's layer; none or two: the table is wrong."""
    matches = [(len(entry), row) for row, (_, entries) in enumerate(table) for entry in entries
               if path == entry or (entry.endswith("/") and path.startswith(entry))]
    longest = max((length for length, _ in matches), default=0)
    return sorted({row for length, row in matches if length == longest})


def layers() -> tuple[dict[str, int], list[str]]:
    """({module: its row in the table, 0 = top}, problems: modules in no row or in two)."""
    table, rows, problems = layer_table(ARCHITECTURE.read_text()), {}, []
    for module, path in module_files().items():
        found = layer_of(path.relative_to(REPO).as_posix(), table)
        if len(found) != 1:
            problems.append(f"{module} is in {'no row' if not found else 'rows ' + str(found)} of the layer table")
        else:
            rows[module] = found[0]
    return rows, problems


def upward_imports(graph: dict[str, dict[str, int]], rows: dict[str, int], table) -> list[str]:
    """Each import of a module in a higher row (a smaller row number) than the importer's own."""
    return [f"{module} ({table[rows[module]][0]}) imports {target} ({table[rows[target]][0]}) at line {line}"
            for module, imports in sorted(graph.items()) for target, line in sorted(imports.items())
            if module in rows and target in rows and rows[target] < rows[module]]


def test_no_import_cycle_counting_imports_inside_functions():
    cycles = find_cycles(import_graph())
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_every_module_is_in_one_row_of_the_documented_layer_table():
    _, problems = layers()
    table = layer_table(ARCHITECTURE.read_text())
    named = [entry for _, entries in table for entry in entries]
    stale = [entry for entry in named if not (REPO / entry).exists()]
    assert problems == [] and stale == [], "; ".join(problems + [f"{e} names nothing" for e in stale])


def test_imports_point_down_the_documented_layers():
    """A module imports only modules of its own row of the table or of rows below it (docs/ARCHITECTURE.md)."""
    rows, _ = layers()
    violations = upward_imports(import_graph(), rows, layer_table(ARCHITECTURE.read_text()))
    assert violations == [], "\n".join(violations)


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_core_reaches_no_evaluator_shard_writer_or_application():
    """Training, models and losses import no evaluator (eval), shard writer (data_prep) or command
    (clipx.apps, clipx.cli), lazily or not: the application that starts a run hands training its
    evaluator and plots. ``python -m clipx.train``'s ``__main__`` is that command line, reached by
    name, and still imports no evaluator itself."""
    offending = {}
    for module, imports in import_graph().items():
        if _within(module, ("clipx.train", "clipx.models", "clipx.losses")):
            above = ("eval", "data_prep") if module == "clipx.train.__main__" else (
                "eval", "data_prep", "clipx.apps", "clipx.cli")
            offending[module] = sorted(i for i in imports if _within(i, above))
    assert {m: i for m, i in offending.items() if i} == {}


def test_the_checks_see_what_they_are_for():
    """The checker on made-up modules: an import inside a function, a relative one, a cycle through
    them, and an import of a higher row are all found."""
    known = {"pkg", "pkg.low", "pkg.high", "pkg.sub", "pkg.sub.leaf"}
    low = ("def f():\n    from pkg.high import thing\n    from .sub import leaf\n"
           "if TYPE_CHECKING:\n    import pkg.sub\n")
    assert imported_modules(low, "pkg.low", False, known) == {"pkg.high": 2, "pkg.sub.leaf": 3}
    assert imported_modules("def g():\n    from .. import low\n", "pkg.sub.leaf", False, known) == {"pkg.low": 2}
    graph = {"pkg.low": {"pkg.high": 2}, "pkg.high": {"pkg.low": 1}}
    assert find_cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]
    table = layer_table("# t\n\n## Layers\n\n| layer | modules | what |\n|---|---|---|\n"
                        "| top | `pkg/high.py`, `pkg/sub/{leaf,x}.py` | |\n| bottom | `pkg/` | |\n\n## Next\n")
    assert table == [("top", ["pkg/high.py", "pkg/sub/leaf.py", "pkg/sub/x.py"]), ("bottom", ["pkg/"])]
    assert layer_of("pkg/sub/leaf.py", table) == [0] and layer_of("pkg/low.py", table) == [1]
    assert layer_of("other/x.py", table) == []
    rows = {"pkg.low": 1, "pkg.high": 0}
    assert upward_imports(graph, rows, table) == ["pkg.low (bottom) imports pkg.high (top) at line 2"]


def test_config_is_the_bottom_layer():
    """config (and its file reading, config_io, and its rules, config_rules) imports nothing of clipx
    but its errors."""
    graph = import_graph()
    assert set(graph["clipx.config"]) <= {"clipx.errors", "clipx.config_io", "clipx.config_rules", "clipx.config_schema"}
    assert set(graph["clipx.config_rules"]) <= {"clipx.errors", "clipx.config_io", "clipx.config_schema"}
    assert set(graph["clipx.config_io"]) <= {"clipx.errors"}
    assert set(graph["clipx.config_schema"]) <= {"clipx.errors"}


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


def test_a_run_without_hooks_says_it_skips_evaluation_and_plots(tmp_path, digits_dir, tiny_model_json, capsys):
    """Training imports no evaluator or report: a run started from Python without RunHooks evaluates
    nothing and draws nothing, and says so, rather than silently dropping what `clipx train` does."""
    from clipx.config import load_config
    from clipx.train.loop import train
    from tests.conftest import tiny_overrides

    summary = train(load_config(None, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "train.steps": 1, "data.workers": 0, "train.batch_size": 16, "train.plots": True,
        "train.attention": "default"})))
    printed = capsys.readouterr().out
    assert summary["steps"] == 1 and summary["eval"] is None
    assert "data.val is not evaluated during training" in printed and "no plots drawn" in printed
    assert not (tmp_path / "run" / "plots").exists()
