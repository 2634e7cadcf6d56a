"""clipx's zero-shot and retrieval evaluators against CLIP_benchmark's on the same model and data.

Used by bench/perf.py. The data are the 1797 digits (train and test splits) at the model's
resolution, written in CLIP_benchmark's webdataset layout (``test/{0..n}.tar`` with ``.jpg``, ``.cls``
and ``.txt``, ``nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt``,
``dataset_type.txt``). Every caption is unique (the digit's template caption plus its scan number),
so no two texts tie in a ranking and both tools must agree exactly. clipx reads the very same
shards (it takes labels from ``.cls`` and captions from ``.txt``).

The model is a clipx checkpoint. Its state dict is already an open_clip ``CustomTextCLIP`` one, so
CLIP_benchmark loads the checkpoint's model.safetensors as ``--pretrained`` through open_clip, with
the model config plus ``"custom_text": true``. Both run as fresh processes with the same batch size,
loader workers and torch threads, alternating; images/s is images over the median wall time of a
whole process (start-up, model loading and the text classifier included on both sides).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_SITE = REPO / "runs" / "bench" / "openclip-site"
SHARD_SIZE = 512
# CLIP_benchmark's metric name -> clipx's, per task.
METRIC_NAMES = {
    "zeroshot_classification": {"acc1": "zero_shot.top1", "acc5": "zero_shot.top5",
                                "mean_per_class_recall": "zero_shot.mean_per_class_recall"},
    "zeroshot_retrieval": {f"{cb}_retrieval_recall@{k}": f"retrieval.{ours}.R@{k}"
                           for cb, ours in (("image", "text_to_image"), ("text", "image_to_text")) for k in (1, 5, 10)},
}


def write_clip_benchmark_dataset(digits_dir: Path, out: Path, classnames: list[str], templates: list[str]) -> int:
    """Both digits splits as one CLIP_benchmark test split (classification and retrieval folders); returns N."""
    samples = []
    for shard in sorted(digits_dir.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in sorted(members.items()):
            if name.endswith(".jpg"):
                key = name[:-4]
                meta = json.loads(members[f"{key}.json"])
                caption = members[f"{key}.txt"].decode().strip()
                samples.append((data, meta["label"], f"{caption} (scan {len(samples)})"))
    for task in ("classification", "retrieval"):
        folder = out / task
        (folder / "test").mkdir(parents=True, exist_ok=True)
        shards = 0
        for start in range(0, len(samples), SHARD_SIZE):
            with tarfile.open(folder / "test" / f"{shards}.tar", "w") as tar:
                for index, (jpg, label, caption) in enumerate(samples[start:start + SHARD_SIZE], start):
                    for suffix, payload in (("jpg", jpg), ("cls", str(label).encode()), ("txt", caption.encode())):
                        info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            shards += 1
        (folder / "test" / "nshards.txt").write_text(str(shards))
        (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text(
            "\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
        (folder / "dataset_type.txt").write_text(task)
    return len(samples)


def open_clip_model_config(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's architecture as an open_clip config that builds a CustomTextCLIP."""
    from clipx.config import load_config

    arch = dict(load_config(checkpoint / "config.yaml").model.arch)
    arch["custom_text"] = True
    path = out / "clipx-export.json"
    path.write_text(json.dumps(arch, indent=1))
    return path


def timed(command: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result


def run_clip_benchmark(task: str, data: Path, model_config: Path, weights: Path, out: Path, batch: int,
                       workers: int, threads: int) -> tuple[float, dict]:
    command = [sys.executable, str(REPO / "bench" / "clip_benchmark_peer.py"), "--model-config",
               str(model_config), "--threads", str(threads), "--", "eval", "--dataset", "wds/digits",
               "--dataset_root", str(data), "--task", task, "--model", model_config.stem, "--pretrained", str(weights),
               "--batch_size", str(batch), "--num_workers", str(workers), "--no_amp", "--output", str(out),
               "--recall_k", "1", "5", "10"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PEER_SITE), str(REPO)])}
    seconds, _ = timed(command, env)
    return seconds, json.loads(out.read_text())["metrics"]


def run_clipx(task: str, data: Path, checkpoint: Path, templates: Path, out: Path, batch: int, workers: int,
              threads: int, precision: str = "fp32") -> tuple[float, dict]:
    from eval.run import flatten_metrics

    name = "zero-shot" if task == "zeroshot_classification" else "retrieval"
    command = [sys.executable, "-m", "clipx.cli", "eval", name, "--checkpoint", str(checkpoint), "--data",
               str(data / "test"), "--out", str(out), "--batch-size", str(batch), "--workers", str(workers),
               "--precision", precision]
    if name == "zero-shot":
        command += ["--templates", str(templates)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    seconds, _ = timed(command, env)
    return seconds, flatten_metrics(json.loads(out.read_text()))


def compare(work: Path, checkpoint: Path, digits_dir: Path, batch: int = 256, workers: int = 2, threads: int = 2,
            repeats: int = 3) -> dict:
    """Both tools on both tasks, ``repeats`` alternating runs each: metrics side by side, their largest
    difference, and the median images/s; and clipx in bf16 (``clipx eval --precision bf16``) beside
    its fp32 self, with the largest metric difference between the two."""
    import statistics

    import yaml

    work.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((REPO / "clipx" / "templates" / "digits.yaml").read_text())
    images = write_clip_benchmark_dataset(digits_dir, work / "data", spec["classnames"], spec["templates"])
    model_config = open_clip_model_config(checkpoint, work)
    report = {"images": images, "batch": batch, "workers": workers, "threads": threads, "repeats": repeats,
              "checkpoint": str(checkpoint), "tasks": {}}
    for task, names in METRIC_NAMES.items():
        data = work / "data" / task.removeprefix("zeroshot_")
        tools = ["clipx", "clip_benchmark", "clipx_bf16"]
        seconds: dict[str, list[float]] = {tool: [] for tool in tools}
        ours: dict[str, dict] = {}  # clipx's metrics per precision
        for repeat in range(repeats):
            for tool in tools[repeat % 3:] + tools[:repeat % 3]:  # each tool leads once in three
                if tool == "clip_benchmark":
                    took, cb = run_clip_benchmark(task, data, model_config, checkpoint / "model.safetensors",
                                                  work / f"clip_benchmark-{task}.json", batch, workers, threads)
                else:
                    precision = "bf16" if tool == "clipx_bf16" else "fp32"
                    took, ours[precision] = run_clipx(task, data, checkpoint, REPO / "clipx" / "templates" / "digits.yaml",
                                                      work / f"{tool}-{task}.json", batch, workers, threads, precision)
                seconds[tool].append(took)
        metrics = {cb_name: {"clip_benchmark": cb[cb_name], "clipx": ours["fp32"][cx_name],
                             "clipx_bf16": ours["bf16"][cx_name]} for cb_name, cx_name in names.items()}
        medians = {tool: statistics.median(values) for tool, values in seconds.items()}
        report["tasks"][task] = {
            "metrics": metrics,
            "max_abs_difference": max(abs(m["clip_benchmark"] - m["clipx"]) for m in metrics.values()),
            "bf16_max_abs_difference": max(abs(m["clipx_bf16"] - m["clipx"]) for m in metrics.values()),
            "seconds": seconds,
            "clip_benchmark_images_per_second": images / medians["clip_benchmark"],
            "clipx_images_per_second": images / medians["clipx"],
            "clipx_bf16_images_per_second": images / medians["clipx_bf16"],
        }
        print(f"  {task}: clipx {medians['clipx']:.1f} s, CLIP_benchmark {medians['clip_benchmark']:.1f} s (medians), "
              f"max metric difference {report['tasks'][task]['max_abs_difference']:.2e}", file=sys.stderr)
    return report
