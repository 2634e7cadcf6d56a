"""Distillation from a teacher CLIP (the config's distill block): the loss against its formula, the
online and embedded teachers against each other, the three teacher layouts against each other,
training both ways, and the settings it refuses. Gather modes on 2 and 3 processes: the exactness
cases of tests/test_matrix.py; resume: the matrix's distill recipe."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.losses.distill import DistillLoss, TeacherView
from tests.conftest import DEMO, clipx_in_process, on_device, tiny_overrides


def _reference(images, texts, scale, teacher_images, teacher_texts, teacher_scale) -> float:
    """KL(teacher || student) of each row's and each column's softmax, averaged, written out in loops."""
    n = len(images)
    student = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    teacher = [[teacher_scale * float(teacher_images[i] @ teacher_texts[j]) for j in range(n)] for i in range(n)]

    def kl(p_logits, q_logits):
        p_norm = math.log(sum(math.exp(x) for x in p_logits))
        q_norm = math.log(sum(math.exp(x) for x in q_logits))
        return sum(math.exp(p - p_norm) * ((p - p_norm) - (q - q_norm)) for p, q in zip(p_logits, q_logits))

    rows = sum(kl(teacher[i], student[i]) for i in range(n)) / n
    columns = sum(kl([teacher[i][j] for i in range(n)], [student[i][j] for i in range(n)]) for j in range(n)) / n
    return (rows + columns) / 2


def _unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def test_the_loss_is_the_kl_of_teacher_to_student_similarities_in_both_directions():
    images, texts = _unit(5, 4, seed=0), _unit(5, 4, seed=1)
    teacher_images, teacher_texts = _unit(5, 3, seed=2), _unit(5, 3, seed=3)  # another width than the student's
    scale = torch.tensor(6.0, dtype=torch.float64)
    teacher = [TeacherView(teacher_images, teacher_texts, 11.0)]
    got = DistillLoss("none")(images, texts, scale, teacher)
    assert abs(got.item() - _reference(images, texts, 6.0, teacher_images, teacher_texts, 11.0)) < 1e-9
    # One process: every gather mode is the dense loss.
    for gather in ("global", "local"):
        assert torch.equal(DistillLoss(gather)(images, texts, scale, teacher), got)
    # A student that is its teacher has nothing left to learn from it; targets carry no gradient.
    assert DistillLoss("none")(images, texts, scale, [TeacherView(images, texts, 6.0)]).abs().item() < 1e-12
    student = images.clone().requires_grad_()
    target = teacher_images.clone().requires_grad_()
    DistillLoss("none")(student, texts, scale, [TeacherView(target, teacher_texts, 11.0)]).backward()
    assert student.grad.abs().sum() > 0 and target.grad is None


def _configs(digits_dir: Path, tiny_model_json: Path, embedded_dir: Path, out: Path):
    base = tiny_overrides(digits_dir, tiny_model_json, out, **{"data.val": "null"})
    online = load_config(DEMO, base + [f"distill.teacher={digits_dir / 'teacher'}"])
    embedded = load_config(DEMO, base + ["distill.embedded=true", f"data.train={embedded_dir}"])
    return online, embedded


def test_online_and_embedded_teachers_give_the_same_loss_on_the_same_batch(digits_dir, tiny_model_json, tmp_path):
    from clipx.data.pipeline import decode_or_reason
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples
    from clipx.methods import build_model, build_objective, method_of
    from clipx.methods.distill import TEACHER_MEMBER
    from data_prep.embed_teacher import embed_teacher

    with pytest.raises(ClipxError, match="holds the input shards"):  # never overwrites its input
        embed_teacher(digits_dir / "teacher", str(digits_dir / "train"), digits_dir / "train")
    result = embed_teacher(digits_dir / "teacher", str(digits_dir / "train"), tmp_path / "embedded", batch_size=100)
    assert result["samples"] == result["embedded"] == 1437 and result["dim"] == 24
    assert json.loads((tmp_path / "embedded" / "sizes.json").read_text()) == \
        json.loads((digits_dir / "train" / "sizes.json").read_text())
    online, embedded = _configs(digits_dir, tiny_model_json, tmp_path / "embedded", tmp_path / "run")
    with open(tmp_path / "embedded" / "shard-000001.tar", "rb") as stream:
        raw = [s for _, s in shard_samples(stream, SkipCounter())][:24]
    with open(digits_dir / "train" / "shard-000001.tar", "rb") as stream:
        original = [s for _, s in shard_samples(stream, SkipCounter())][:24]
    assert [{k: v for k, v in s.items() if k != TEACHER_MEMBER} for s in raw] == original  # copied unchanged

    method = method_of(online)
    transform, collate = method.train_transform(online), method.collate(online)
    torch.manual_seed(0)
    samples = [{"image": decode_or_reason(s, transform)[0], "text": s["txt"].decode(), "key": s["__key__"]}
               for s in raw]
    online_batch = on_device(collate(samples), online)
    embedded_batch = on_device(method_of(embedded).collate(embedded)(
        [{**sample, "image": sample["image"][0], TEACHER_MEMBER: s[TEACHER_MEMBER]} for sample, s in zip(samples, raw)]),
        embedded)
    assert torch.equal(online_batch["image"], embedded_batch["image"])

    torch.manual_seed(0)
    model = build_model(online).eval()
    with torch.no_grad():
        by_online = build_objective(model, online)(online_batch)
        by_embedded = build_objective(model, embedded)(embedded_batch)
    assert by_online["metrics"]["distill_loss"] > 0
    for name in ("distill_loss", "student_loss"):
        assert abs(by_online["metrics"][name] - by_embedded["metrics"][name]) <= 1e-5, name
    assert abs(by_online["loss"] - by_embedded["loss"]) <= 1e-5


def test_a_clipx_teacher_exported_to_open_clip_and_transformers_embeds_alike(digits_dir, tmp_path):
    from clipx.apps.export import export_open_clip
    from clipx.apps.export_hf import export_hf
    from clipx.data.pipeline import decode_or_reason
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples
    from clipx.methods import load_teacher

    teacher = digits_dir / "teacher"
    layouts = {"clipx": teacher, "open_clip": export_open_clip(teacher, tmp_path / "open_clip"),
               "transformers": export_hf(teacher, tmp_path / "hf")}
    with open(digits_dir / "test" / "shard-000000.tar", "rb") as stream:
        raw = [s for _, s in shard_samples(stream, SkipCounter())][:16]
    captions = [s["txt"].decode() for s in raw]
    embedded = {}
    for name, path in layouts.items():
        loaded = load_teacher(path)
        assert loaded.source.startswith(name)
        images = torch.stack([decode_or_reason(s, loaded.transform)[0] for s in raw])
        embedded[name] = (loaded.embed(images, loaded.tokenize(captions)), loaded.logit_scale)
    (reference_image, reference_text), scale = embedded["clipx"]
    for name, ((image, text), their_scale) in embedded.items():
        assert abs(their_scale - scale) < 1e-4, name
        assert (image - reference_image).abs().max() < 1e-4, name
        assert (text - reference_text).abs().max() < 1e-4, name


def _train(overrides: list[str]) -> subprocess.CompletedProcess:
    return clipx_in_process("train", "--config", DEMO, *overrides)


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


def test_training_with_the_online_and_the_embedded_teacher_logs_the_same_losses(digits_dir, tiny_model_json, tmp_path):
    runs = {}
    for form, extra in (("online", [f"distill.teacher={digits_dir / 'teacher'}"]),
                        ("embedded", ["distill.embedded=true", f"data.train={digits_dir / 'train-teacher'}"])):
        out = tmp_path / form
        result = _train(tiny_overrides(digits_dir, tiny_model_json, out, **{"data.val": "null", "data.workers": 1})
                        + extra)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[form] = _records(out)
    assert len(runs["online"]) == 4 and all(r["distill_loss"] > 0 for r in runs["online"])
    for online, embedded in zip(runs["online"], runs["embedded"]):
        for name in ("loss", "distill_loss", "student_loss"):
            assert abs(online[name] - embedded[name]) <= 1e-5, (online["step"], name)


@pytest.mark.parametrize("extra, message", [
    (["loss.name=ntxent", "distill.teacher={teacher}"], "distill (a teacher CLIP's similarities as targets) applies"),
    (["distill.teacher={missing}"], "distill.teacher"),
    (["distill.teacher={teacher}", "distill.embedded=true"], "exclude each other"),
    (["distill.embedded=true", "data.caption_keys={{txt: 1}}"], "distill.embedded stores"),
    (["distill.embedded=true"], "no readable teacher.json"),
    (["distill.teacher={teacher}", "distill.weight=-1"], "distill.weight must be"),
])
def test_distill_settings_it_cannot_train_are_refused_in_one_line(digits_dir, tiny_model_json, tmp_path, extra, message):
    extra = [e.format(teacher=digits_dir / "teacher", missing=tmp_path / "nowhere") for e in extra]
    result = _train(tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run") + extra)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_feature_cached_accumulation_runs_an_online_teacher_once_per_micro_batch(digits_dir, tiny_model_json, tmp_path,
                                                                                 monkeypatch):
    """train.accum_mode=features replays the student with autograd; the frozen teacher's embeddings
    of the first pass serve the replay. The gradients are those of one batch of the union."""
    import contextlib

    from clipx.data.pipeline import decode_or_reason
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples
    from clipx.methods import build_model, build_objective, method_of
    from clipx.train.step import micro_batch_gradients

    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "data.val": "null", "distill.teacher": str(digits_dir / "teacher")}))
    method = method_of(config)
    transform, collate = method.train_transform(config), method.collate(config)
    with open(digits_dir / "train" / "shard-000001.tar", "rb") as stream:
        raw = [s for _, s in shard_samples(stream, SkipCounter())][:16]
    torch.manual_seed(0)
    samples = [{"image": decode_or_reason(s, transform)[0], "text": s["txt"].decode(), "key": s["__key__"]}
               for s in raw]
    micro_batches = [on_device(collate(samples[:8]), config), on_device(collate(samples[8:]), config)]
    union = on_device(collate(samples), config)

    class OneProcess:  # what micro_batch_gradients asks of an Accelerator
        scaler = None

        def backward(self, loss):
            loss.backward()

        def no_sync(self, model):
            return contextlib.nullcontext()

    torch.manual_seed(0)
    model = build_model(config).eval()  # no dropout: the two ways see the same function
    objective = build_objective(model, config)
    (teacher,), calls = objective.teachers, []
    embed = teacher.embed
    monkeypatch.setattr(teacher, "embed", lambda *args: calls.append(1) or embed(*args))  # a cached, shared teacher
    micro_batch_gradients(OneProcess(), model, objective, micro_batches, "features")
    assert len(calls) == len(micro_batches)
    cached = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    objective(union)["loss"].backward()
    assert cached.keys() == {name for name, p in model.named_parameters() if p.grad is not None} and cached
    for name, grad in cached.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
