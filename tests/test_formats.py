"""Formats other tools write: img2dataset training shards and CLIP_benchmark evaluation folders."""

import io
import json
import shutil
import tarfile

import pytest

from clipx.cli import main
from clipx.config import load_config
from clipx.data.shards import count_samples, expand_shards
from clipx.errors import ClipxError
from tests.conftest import DEMO, tiny_overrides


def write_img2dataset_folder(digits_dir, out):
    """The digits re-written the way img2dataset lays out its output: 00000.tar + 00000_stats.json
    (+ 00000.parquet), keys like 000000012, a .json with its download metadata, no sizes.json."""
    out.mkdir(parents=True)
    for index, shard in enumerate(sorted((digits_dir / "train").glob("*.tar"))[:3]):
        name = f"{index:05d}"
        count = 0
        with tarfile.open(shard) as source, tarfile.open(out / f"{name}.tar", "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                key, suffix = member.name.split(".", 1)
                if suffix == "json":
                    meta = json.loads(data)
                    data = json.dumps({"url": f"https://example.com/{key}.jpg", "key": f"{name}{count:04d}",
                                       "status": "success", "caption": None, "width": 32, "height": 32,
                                       "label": meta["label"]}).encode()
                    count += 1
                info = tarfile.TarInfo(f"{name}{key[-4:]}.{suffix}")
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
        (out / f"{name}_stats.json").write_text(json.dumps({"count": count + 3, "successes": count,
                                                           "failed_to_download": 3, "failed_to_resize": 0}))
        (out / f"{name}.parquet").write_bytes(b"PAR1")  # img2dataset writes one; clipx does not read it
    return out


def test_img2dataset_shards_train_without_conversion(tmp_path, digits_dir, tiny_model_json):
    from clipx.train.loop import train

    folder = write_img2dataset_folder(digits_dir, tmp_path / "img2dataset")
    urls = expand_shards(str(folder))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    assert count_samples(urls) == sum(json.loads(p.read_text())["successes"] for p in folder.glob("*_stats.json"))
    summary = train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "data.train": folder, "data.val": "null", "train.steps": 3})))
    assert summary["steps"] == 3 and summary["skipped"]["used"] >= 3 * 64

    (folder / "00001_stats.json").write_text("{}")
    with pytest.raises(ClipxError, match="00001_stats.json has no readable 'successes'"):
        count_samples(urls)


def test_clip_benchmark_folders_evaluate_like_the_same_shards_and_templates(tmp_path, digits_dir, tiny_model_json):
    import yaml

    from bench.eval_vs_clip_benchmark import write_clip_benchmark_dataset
    from clipx.train.loop import train

    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "data.val": "null", "train.steps": 2})))
    test_only = tmp_path / "digits-test"
    shutil.copytree(digits_dir / "test", test_only / "test")
    spec = yaml.safe_load((DEMO.parent.parent / "clipx" / "templates" / "digits.yaml").read_text())
    write_clip_benchmark_dataset(test_only, tmp_path / "cb", spec["classnames"], spec["templates"])
    folder = tmp_path / "cb" / "classification"
    assert (folder / "zeroshot_classification_templates.txt").read_text().count("{c}") == len(spec["templates"])

    args = ["eval", "zero-shot", "--checkpoint", str(tmp_path / "run"), "--workers", "0"]
    assert main([*args, "--data", str(folder), "--out", str(tmp_path / "cb.json")]) == 0
    shards = f"{folder}/test/{{0..{int((folder / 'test' / 'nshards.txt').read_text()) - 1}}}.tar"
    assert main([*args, "--data", shards, "--templates", "digits", "--out", str(tmp_path / "ours.json")]) == 0
    from_folder, direct = (json.loads((tmp_path / name).read_text()) for name in ("cb.json", "ours.json"))
    assert from_folder["num_images"] == direct["num_images"] == 360
    assert from_folder["zero_shot"] == direct["zero_shot"]

    (folder / "classnames.txt").unlink()
    assert main([*args, "--data", str(folder), "--out", str(tmp_path / "x.json")]) == 2


def test_clipx_eval_equals_clip_benchmark_on_the_same_exported_model_and_folder(tmp_path, digits_dir, tiny_model_json):
    """CLIP_benchmark's own CLI (installed for tests by bench/openclip_env.sh, which `make test`
    runs) against `clipx eval` on one CLIP_benchmark folder and the checkpoint's weights."""
    import yaml

    from bench.eval_vs_clip_benchmark import (
        METRIC_NAMES,
        PEER_SITE,
        open_clip_model_config,
        run_clip_benchmark,
        run_clipx,
        write_clip_benchmark_dataset,
    )
    from clipx.train.checkpoint import list_checkpoints
    from clipx.train.loop import train

    assert (PEER_SITE / "clip_benchmark").is_dir(), "run bench/openclip_env.sh (make test does)"
    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "data.val": "null", "train.steps": 20, "train.warmup_steps": 2})))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    test_only = tmp_path / "digits-test"
    shutil.copytree(digits_dir / "test", test_only / "test")
    templates = DEMO.parent.parent / "clipx" / "templates" / "digits.yaml"
    spec = yaml.safe_load(templates.read_text())
    write_clip_benchmark_dataset(test_only, tmp_path / "cb", spec["classnames"], spec["templates"])
    model_config = open_clip_model_config(checkpoint, tmp_path)
    for task, names in METRIC_NAMES.items():
        data = tmp_path / "cb" / task.removeprefix("zeroshot_")
        _, theirs = run_clip_benchmark(task, data, model_config, checkpoint / "model.safetensors",
                                       tmp_path / f"cb-{task}.json", 128, 0, 1)
        _, ours = run_clipx(task, data, checkpoint, templates, tmp_path / f"cx-{task}.json", 128, 0, 1)
        for their_name, our_name in names.items():
            assert abs(theirs[their_name] - ours[our_name]) <= 1e-4, (task, their_name, theirs, ours)
