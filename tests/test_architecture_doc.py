"""docs/ARCHITECTURE.md says only what is true: every file and name it mentions exists, the length
rule it states holds, and a run leaves the process as it found it, as it says.

The document is the map newcomers read first; a map that names a moved function or a deleted module
sends them looking for code that is not there. So the names are checked mechanically: a rename that
forgets the document fails here, with the list of what no longer resolves.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import keyword
import os
import re
import sys
import types
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("clipx", "eval", "data_prep")  # the installed code, which the length rule covers
ROOTS = (*PACKAGES, "tests", "bench", "docs", "configs")  # top-level folders a path in the document may start with
CLIPX_DIRS = ("apps", "data", "losses", "methods", "models", "ssl", "templates", "train")  # written relative to clipx/

# ---- what the repository defines -------------------------------------------------------------------


@functools.cache
def python_files() -> tuple[Path, ...]:
    return tuple(sorted(f for root in (*PACKAGES, "tests", "bench") for f in (REPO / root).rglob("*.py")))


def _targets(node: ast.AST) -> list[str]:
    """Names an assignment binds (plain names, and tuple unpacking)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [n for elt in node.elts for n in _targets(elt)]
    return []


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """What a module or class body defines: functions, classes, assigned and annotated names, imports
    (a re-export is a name of the module), including those under if/try at that level."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n for target in node.targets for n in _targets(target))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            names.update(_targets(node.target))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *[h.body for h in getattr(node, "handlers", [])]):
                names |= _bound_names(block)
    return names


@functools.cache
def index() -> tuple[dict[str, set[str]], dict[str, list[tuple[set[str], list[str]]]]]:
    """(module file -> its top-level names, class name -> [(its members, its base names)]). A class's
    members include the attributes its methods assign on ``self``."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, list[tuple[set[str], list[str]]]] = {}
    for path in python_files():
        tree = ast.parse(path.read_text())
        modules[path.relative_to(REPO).as_posix()] = _bound_names(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                members = _bound_names(node.body)
                for sub in ast.walk(node):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                            and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                        members.add(sub.attr)
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes.setdefault(node.name, []).append((members, bases))
    return modules, classes


def class_has(name: str, member: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether some class called ``name`` (in this repository) or one of its bases here defines ``member``."""
    if name in seen:
        return False
    for members, bases in index()[1].get(name, []):
        if member in members or any(class_has(b, member, seen | {name}) for b in bases):
            return True
    return False


def module_files(dotted: str) -> list[str]:
    """The file of a module written in full (``clipx.train.loop``) or by its last part(s) as the
    document does in places (``loop``, ``train.loop``, ``ntxent``), relative to the repository."""
    parts = dotted.split(".")
    wanted = ["/".join(parts) + ".py", "/".join(parts) + "/__init__.py"]
    files = index()[0]
    exact = [f for f in wanted if f in files]
    if exact:
        return exact
    return [f for f in files if any(f.endswith("/" + w) for w in wanted)]


def resolves_in_module(file: str, chain: list[str]) -> bool:
    """``chain`` (a name, or a class and its member) is defined in ``file``."""
    names = index()[0][file]
    if not chain:
        return True
    if chain[0] not in names:
        return False
    return len(chain) == 1 or class_has(chain[0], chain[1])


# ---- the config, whose keys the document names too ---------------------------------------------------


@functools.cache
def config_sections() -> dict[str, type]:
    from clipx.config import Config

    return {f.name: f.type for f in fields(Config)}


def config_key_exists(dotted: str) -> bool:
    """``train.ema_decay``, ``ssl.moco.queue_size``, ``model.lora_*``: a field of the config's sections."""
    from typing import get_type_hints

    from clipx.config import Config

    cls, parts = Config, dotted.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return False
        hints = get_type_hints(cls)
        if part.endswith("*"):
            return i == len(parts) - 1 and any(name.startswith(part[:-1]) for name in hints)
        if part not in hints:
            return False
        cls = hints[part]
        # Optional[Section]: the section's class
        args = [a for a in getattr(cls, "__args__", ()) if isinstance(a, type) and is_dataclass(a)]
        cls = args[0] if args else cls
    return True


# ---- what the document names ---------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w./-])((?:[\w*-]+|\{[\w,]+\})(?:/(?:[\w*.-]+|\{[\w,.]+\}))*(?:/|\.(?:py|json|md|yaml|toml)\b))")
PATH_SYMBOL = re.compile(r"([\w/{},.-]+\.py):(\w+(?:\.\w+)?)")
DOTTED = re.compile(r"(?<![\w./:-])([A-Za-z_]\w*(?:\.[A-Za-z_*][\w*]*)+)(?![\w/-]|\.py\b)")
# Instances the document calls by their class's lowercase name (`objective.end_step`: Objective's).
INSTANCES = {"objective": "Objective", "method": "Method", "verdict": "Verdict", "trainer": "Trainer",
             "guard": "UpdateGuard", "stream": "TrainStream", "METHODS": "Registry", "config": "Config"}
# Outside libraries and words a dotted name may also be (a run folder, a file suffix, a metric key).
FOREIGN = ("torch.", "accelerate", "accelerator.", "open_clip", "transformers", "wandb", "fsspec", "self.",
           "safetensors", "sentence_transformers", "nn.", "tarfile", "webdataset", "e.g", "i.e")
NOT_NAMES = {"classifier.top1", "zero_shot.top1"}  # wise_ft.json's metric keys, not code
# Files a run or a data set holds (metrics.jsonl, model_ema.safetensors, sts.tsv): named, not in the repository.
DATA_SUFFIXES = ("json", "jsonl", "safetensors", "tsv", "npy", "yaml", "txt", "png", "html", "tar", "csv", "pt")
EXAMPLES = {"mymethod.py"}  # the recipe's module to be written


def expand_braces(text: str) -> list[str]:
    """``clipx/methods/{clip,siglip}.py`` -> both paths."""
    pieces = re.split(r"(\{[^{}]*\})", text)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in pieces]
    return ["".join(combo) for combo in itertools.product(*options)]


def code_spans(doc: str) -> list[str]:
    """The document's `inline code` and fenced blocks: where it names code."""
    fenced = re.findall(r"```.*?\n(.*?)```", doc, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", doc, flags=re.S))
    return fenced + inline


def path_exists(path: str) -> bool:
    """A path from the repository root, or relative to clipx/ (``train/loop.py``), or a bare file name
    the document gives after its folder (``position.py`` in a list of clipx/data's modules)."""
    if any(ch in path for ch in "*?"):
        return any(REPO.glob(path))
    if "/" not in path.rstrip("/"):  # searched for in the repository's own folders, never in .venv
        name = path.rstrip("/")
        within = [REPO / root for root in ROOTS]
        found = [f for folder in within for f in [folder, *folder.rglob(name)] if f.name == name]
        return any(f.is_dir() == path.endswith("/") for f in found)
    return (REPO / path).exists() or (REPO / "clipx" / path).exists()


def unresolved(doc: str) -> list[str]:
    """Every file path and code name in ``doc`` that this repository does not have, as readable lines."""
    problems: list[str] = []
    # Folders written alone (`report/`) only count in code spans: prose has "CLIP/SigLIP" and "alpha/r".
    folders = {p for span in code_spans(doc) for p in re.findall(r"(?<![\w./-])([\w-]+/)(?![\w.-])", span)}
    for raw in sorted((set(PATH.findall(doc)) | folders) - EXAMPLES):
        first = raw.split("/")[0]
        if "/" not in raw.rstrip("/") and not raw.endswith(".py") and raw not in folders:
            continue  # a bare word with a suffix (model.safetensors, config.yaml): a file a run writes
        if first not in ROOTS and first not in CLIPX_DIRS and "/" in raw.rstrip("/"):
            continue  # RUN_DIR/…, checkpoints/step-N: places at run time, not in the repository
        for path in expand_braces(raw):
            if not path_exists(path):
                problems.append(f"path {path}")
    spans = code_spans(doc) + re.findall(r"\bclipx(?:\.\w+)+", doc)  # prose names modules too: (clipx.apps.wise_ft)
    for span in spans:
        for raw_path, symbol in PATH_SYMBOL.findall(span):
            for path in expand_braces(raw_path):
                files = [f for f in index()[0] if f == path or f == "clipx/" + path or f.endswith("/" + path)]
                if not any(resolves_in_module(f, symbol.split(".")) for f in files):
                    problems.append(f"name {path}:{symbol}")
        span = PATH_SYMBOL.sub(" ", span)
        for dotted in DOTTED.findall(PATH.sub(" ", span)):
            if (dotted.startswith(FOREIGN) or dotted in NOT_NAMES or dotted[0].isdigit()
                    or dotted.rsplit(".", 1)[1] in DATA_SUFFIXES or is_foreign_module(dotted.split(".")[0])):
                continue
            if not dotted_resolves(dotted):
                problems.append(f"name {dotted}")
    problems += [f"name {name}" for name in bare_names(doc) if name not in known_words()]
    return sorted(set(problems))


@functools.cache
def is_foreign_module(name: str) -> bool:
    """A top-level module of the standard library or an installed package (`dataclasses.replace`)."""
    if name in PACKAGES or name in config_sections() or name in INSTANCES or module_files(name):
        return False
    return importlib.util.find_spec(name) is not None


@functools.cache
def known_words() -> frozenset[str]:
    """Every name the code defines or uses as a word: modules, module-level names, classes and their
    members, parameters and keywords, and one-word string constants (config values such as `global`)."""
    modules, classes = index()
    words = set().union(*modules.values()) | set(classes) | {m for cls in classes.values() for ms, _ in cls for m in ms}
    words |= {part.removesuffix(".py") for path in modules for part in path.split("/")}  # modules: `config_io`
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.arg):
                words.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                words.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+", node.value):
                words.add(node.value)
    return frozenset(words)


def bare_names(doc: str) -> set[str]:
    """Code spans that are one identifier, or a call of one (`compile_choice`, `features(batch)`)."""
    found = {m.group(1) for span in code_spans(doc) if (m := re.fullmatch(r"([A-Za-z_]\w*)(?:\(.*\))?", span.strip()))}
    return {name for name in found if not keyword.iskeyword(name)}


def dotted_resolves(dotted: str) -> bool:
    """A config key (``train.threads``), a module and its names (``clipx.config.load_config``,
    ``config_rules.validate``), or a class and its member (``UpdateGuard.post``, ``objective.end_step``)."""
    parts = dotted.split(".")
    if parts[0] in config_sections() and config_key_exists(dotted):
        return True
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        files = module_files(".".join(parts[:cut]))
        if files:
            if any(resolves_in_module(f, parts[cut:]) for f in files):
                return True
            break
    if len(parts) == 2:
        cls = INSTANCES.get(parts[0], parts[0])
        if cls in index()[1]:
            return class_has(cls, parts[1])
    return False


def test_every_path_and_name_in_the_architecture_doc_exists():
    missing = unresolved(DOC.read_text())
    assert not missing, ("docs/ARCHITECTURE.md names what the repository does not have (moved or renamed? "
                         "fix the document):\n  " + "\n  ".join(missing))


def test_the_doc_check_sees_a_name_disappear():
    """The check above would pass on a resolver that accepts anything: each reference form, made
    wrong, must be reported."""
    made_up = ("`clipx/nowhere.py`, `clipx/methods/{clip,nosuch}.py`, `train/noloop.py`, `clipx.config.no_such`, "
               "`config.check_classes`, `train/loop.py:no_step`, `UpdateGuard.no_method`, `objective.no_end`, "
               "`train.no_such_key`, `clipx/train/`, `clipx/train/loop.py:fit`, `no_such_function`, `NoSuchClass(x)`, `nosuch.py`, `nodir/`, `loop.py`, `report/`")
    assert unresolved(made_up) == sorted([
        "path clipx/nowhere.py", "path clipx/methods/nosuch.py", "path train/noloop.py", "name clipx.config.no_such",
        "name config.check_classes", "name train/loop.py:no_step", "name UpdateGuard.no_method",
        "name objective.no_end", "name train.no_such_key", "name no_such_function", "name NoSuchClass", "path nosuch.py",
        "path nodir/"])


# ---- the length rule ------------------------------------------------------------------------------------

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50
# Functions longer than MAX_FUNCTION_LINES, each by name. The list must equal what the code has, so a
# new long function fails the test (split it, or add it here knowingly) and a split one must leave it.
LONG_FUNCTIONS = {
    "clipx/apps/prep_cli.py:add_prep",
    "clipx/data/pipeline.py:decode_train_samples",
    "clipx/data/tar_reader.py:shard_samples",
    "clipx/train/build.py:build_trainer",
    "data_prep/digits.py:prep_digits",
}


def package_modules() -> list[Path]:
    return [f for f in python_files() if f.relative_to(REPO).parts[0] in PACKAGES]


def test_every_module_is_under_the_line_limit():
    long = {f.relative_to(REPO).as_posix(): n for f in package_modules()
            if (n := len(f.read_text().splitlines())) >= MAX_MODULE_LINES}
    assert long == {}, f"modules of {MAX_MODULE_LINES} lines or more (split them): {long}"


def long_functions() -> dict[str, int]:
    """``path:Class.function`` -> lines (def to last line, docstring included) for every function,
    method and nested function longer than MAX_FUNCTION_LINES."""
    found = {}

    def walk(node: ast.AST, prefix: str, path: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                if (lines := child.end_lineno - child.lineno + 1) > MAX_FUNCTION_LINES:
                    found[f"{path}:{name}"] = lines
                walk(child, name + ".", path)
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".", path)
            else:
                walk(child, prefix, path)

    for f in package_modules():
        walk(ast.parse(f.read_text()), "", f.relative_to(REPO).as_posix())
    return found


def test_long_functions_are_the_listed_ones():
    found = long_functions()
    assert set(found) == LONG_FUNCTIONS, (
        f"new functions over {MAX_FUNCTION_LINES} lines (split them, or list them knowingly): "
        f"{ {k: v for k, v in found.items() if k not in LONG_FUNCTIONS} }; "
        f"listed ones that are no longer long or gone (take them off the list): {sorted(LONG_FUNCTIONS - set(found))}")


def test_the_doc_states_the_length_rule_the_test_enforces():
    doc = DOC.read_text()
    assert f"under {MAX_MODULE_LINES} lines" in doc and f"{MAX_FUNCTION_LINES} lines" in doc
    assert "tests/test_architecture_doc.py" in doc


# ---- a run leaves the process as it found it ---------------------------------------------------------


class FakeWandb(types.ModuleType):
    """wandb's init/log/finish, recording what init was given (wandb itself is optional and absent)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)


def environment() -> dict[str, str]:
    """os.environ without the variable pytest itself rewrites at each test phase."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


class ProcessProbe:
    """The thread count and environment before a run, a thread count for the run other than the
    process's, and a fake wandb that records how it was started."""

    def __init__(self, wandb: FakeWandb):
        self.wandb = wandb
        self.threads, self.environ = torch.get_num_threads(), environment()
        self.run_threads = 1 if self.threads != 1 else 2

    def changes(self) -> dict:
        """What differs from before the run: {} when the run left the process as it found it."""
        changed = {}
        if torch.get_num_threads() != self.threads:
            changed["threads"] = (self.threads, torch.get_num_threads())
        env = environment()
        if env != self.environ:
            changed["environ"] = {k: (self.environ.get(k), env.get(k)) for k in set(env) | set(self.environ)
                                  if self.environ.get(k) != env.get(k)}
        return changed

    def undo(self) -> None:
        """Put back whatever the run left, so that one failing test leaks nothing into the next."""
        torch.set_num_threads(self.threads)
        for key in set(environment()) - set(self.environ):
            del os.environ[key]
        os.environ.update(self.environ)


@pytest.fixture
def probe(monkeypatch):
    import clipx.train.loop  # noqa: F401  (Accelerate, imported first here, asks importlib whether wandb exists)

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    found = ProcessProbe(wandb)
    yield found
    found.undo()


def run_overrides(digits_dir, tiny_model_json, out: Path, threads: int) -> list[str]:
    from tests.conftest import tiny_overrides

    return tiny_overrides(digits_dir, tiny_model_json, out, **{
        "train.steps": 1, "data.workers": 0, "data.val": "null", "train.batch_size": 16, "train.threads": threads,
        "train.attention": "default", "train.wandb_project": "clipx-tests"})


def test_a_run_puts_threads_and_the_environment_back(probe, digits_dir, tiny_model_json, tmp_path, monkeypatch):
    """One step, in this process: train.threads and wandb's offline mode hold for the run only."""
    from clipx.config import load_config
    from clipx.train import loop

    seen = {}
    real_run_loop = loop.run_loop

    def watching_run_loop(*args):
        seen["threads"] = torch.get_num_threads()
        return real_run_loop(*args)

    monkeypatch.setattr(loop, "run_loop", watching_run_loop)
    summary = loop.train(load_config(None, run_overrides(digits_dir, tiny_model_json, tmp_path / "run",
                                                         probe.run_threads)))
    assert summary["steps"] == 1
    assert probe.changes() == {}
    assert seen == {"threads": probe.run_threads}  # the run did run with its own count
    assert [init.get("mode") for init in probe.wandb.inits] == ["offline"]  # and wandb offline, without WANDB_MODE


def test_a_failed_run_puts_threads_back(probe, digits_dir, tiny_model_json, tmp_path, monkeypatch):
    from clipx.config import load_config
    from clipx.train import loop

    def failing_run_loop(*args):
        assert torch.get_num_threads() == probe.run_threads
        raise RuntimeError("the run failed")

    monkeypatch.setattr(loop, "run_loop", failing_run_loop)
    with pytest.raises(RuntimeError, match="the run failed"):
        loop.train(load_config(None, run_overrides(digits_dir, tiny_model_json, tmp_path / "run", probe.run_threads)))
    assert probe.changes() == {}


def test_wandb_keeps_the_users_mode(monkeypatch, tmp_path):
    """A WANDB_MODE the user set is wandb's to read: clipx passes no mode over it, and changes no variable."""
    from clipx.train.metrics_log import start_wandb

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_MODE", "online")
    start_wandb("clipx-tests", tmp_path, None)
    assert "mode" not in wandb.inits[0] and os.environ["WANDB_MODE"] == "online"
