"""Run plots and the HTML report, rendered in headless Chromium with every image decoded."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from clipx.apps.report.html import write_report
from clipx.config import load_config
from tests.conftest import DEMO, tiny_overrides

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_dir, tiny_model_json):
    from tests.conftest import train_evaluated

    out = tmp_path_factory.mktemp("report-run")
    overrides = tiny_overrides(digits_dir, tiny_model_json, out, **{"train.steps": 6, "eval.every": 3, "train.plots": True})
    train_evaluated(load_config(DEMO, overrides))  # evaluated during training and plotted, as `clipx train` does
    return out


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed: `make test` installs Debian's chromium package"
    return path


def rendered_dom(page, profile) -> subprocess.CompletedProcess:
    """The page's DOM after its load handlers ran, as headless Chromium dumps it (``.stdout``)."""
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)


def test_training_writes_plots_beside_its_metrics(run_dir):
    names = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"loss.png", "lr.png", "logit_scale.png", "throughput.png", "eval.png"} <= names
    for name in names:
        assert Image.open(run_dir / "plots" / name).size[0] > 300


def test_the_report_renders_in_headless_chromium_with_every_image(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "report.html")
    text = page.read_text()
    assert "Retrieval gallery" in text and "Zero-shot confusion matrix" in text and "Final metrics" in text
    images_in_html = len(re.findall(r"<img ", text))
    assert images_in_html >= 5 + 4 * 5 + 1  # plots, 4 queries x top 5, confusion matrix

    profile = tmp_path / "profile"
    dom = rendered_dom(page, profile)
    assert 'data-images-rendered="true"' in dom.stdout, dom.stderr[-2000:]
    assert f'data-image-count="{images_in_html}"' in dom.stdout

    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page


class FakeWandbRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_weights_and_biases_gets_the_same_scalars_when_enabled(tmp_path, monkeypatch):
    import sys
    import types

    from clipx.errors import ClipxError
    from clipx.train.metrics_log import MetricsLog

    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path / "run", wandb_project="clipx-tests", config={"train": {"lr": 0.1}})
    log.log(3, "train", {"loss": 2.5, "lr": 0.1, "nan": float("nan")})
    log.close()
    (run,) = runs
    assert run.init["project"] == "clipx-tests" and run.init["config"] == {"train": {"lr": 0.1}}
    assert run.logged == [(3, {"train/loss": 2.5, "train/lr": 0.1})] and run.finished

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ClipxError, match="wandb is not installed"):
        MetricsLog(tmp_path / "run2", wandb_project="clipx-tests")
