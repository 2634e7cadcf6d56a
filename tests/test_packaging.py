"""A regular (non-editable) install ships clipx, eval and data_prep, with the template files (and not
the benchmarks, which live in bench/ of the checkout)."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def build_wheel(tmp_path):
    """Build from a copy of the tracked files: building in the checkout would leave build/ there."""
    source = tmp_path / "source"
    listing = ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("clipx_trainer-*.whl")
    return wheel


def test_wheel_contains_all_three_packages_and_template_files(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("clipx/cli.py", "clipx/train/loop.py", "eval/metrics.py", "eval/zero_shot.py",
                     "clipx/templates/digits.yaml", "clipx/templates/imagenet.yaml", "data_prep/digits.py",
                     "data_prep/writer.py"):
        assert required in names, required
    assert not any(n.startswith(("tests/", "bench/")) for n in names)  # benchmarks stay in the checkout


def test_wheel_imports_outside_the_checkout(tmp_path):
    """Unpacked alone (no repo on sys.path), the evaluators and shard writers import and find templates."""
    wheel = build_wheel(tmp_path)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()];"
            "sys.path.insert(0, sys.argv[1]);"
            "import eval.metrics, data_prep, clipx.cli; from clipx.templates import load_templates;"
            "assert eval.metrics.__file__.startswith(sys.argv[1]);"
            "print(len(load_templates('imagenet')[0]))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000"
