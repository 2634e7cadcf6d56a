"""Reinforced shards (`clipx prep reinforce`, data.reinforced) and ensemble distillation: replayed views
equal the writer's bitwise, the ensemble loss equals its formula, the stored and online ensembles give
one loss, and the writer resumes, runs in several processes, captions, and refuses bad input in one
line. Resume and 2 processes: the matrix's reinforced recipes; gathers on 2 and 3 processes: its
exactness cases."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipx.data.opener import ShardOpener
from clipx.data.pipeline import sample_image_bytes
from clipx.data.reinforce import VIEWS_MEMBER, ViewRecipe, load_records, render_view, teacher_member
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples
from clipx.errors import ClipxError
from clipx.losses.distill import DistillLoss, TeacherView
from tests.conftest import clipx_in_process

# ---------------------------------------------------------------- the ensemble loss against its formula


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def _reference(images, texts, scale, teachers, ensemble: str) -> float:
    """KL(ensemble || student) of each row's and each column's softmax, averaged, written out in loops."""
    n = len(images)

    def logits(a, b, s):
        return [[s * float(a[i] @ b[j]) for j in range(n)] for i in range(n)]

    student = logits(images, texts, scale)
    per_teacher = [logits(t_images, t_texts, t_scale) for t_images, t_texts, t_scale in teachers]

    def targets(rows_of):  # rows_of(matrix, i) -> the i-th distribution's logits
        out = []
        for i in range(n):
            if ensemble == "probabilities":
                each = [_softmax(rows_of(m, i)) for m in per_teacher]
                out.append([sum(p[j] for p in each) / len(each) for j in range(n)])
            else:
                out.append(_softmax([sum(rows_of(m, i)[j] for m in per_teacher) / len(per_teacher) for j in range(n)]))
        return out

    def kl(p, q_logits):
        q = _softmax(q_logits)
        return sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))

    row = lambda m, i: m[i]  # noqa: E731
    column = lambda m, j: [m[i][j] for i in range(n)]  # noqa: E731
    rows = sum(kl(p, row(student, i)) for i, p in enumerate(targets(row))) / n
    columns = sum(kl(p, column(student, j)) for j, p in enumerate(targets(column))) / n
    return (rows + columns) / 2


def _unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("ensemble", ["probabilities", "logits"])
def test_the_ensemble_loss_is_its_formula_for_teachers_of_their_own_width_and_temperature(ensemble):
    images, texts = _unit(6, 4, seed=0), _unit(6, 4, seed=1)
    teachers = [TeacherView(_unit(6, 3, seed=2), _unit(6, 3, seed=3), 11.0),
                TeacherView(_unit(6, 5, seed=4), _unit(6, 5, seed=5), 4.0),
                TeacherView(_unit(6, 3, seed=6), _unit(6, 3, seed=7), 25.0)]
    scale = torch.tensor(6.0, dtype=torch.float64)
    got = DistillLoss("none", ensemble)(images, texts, scale, teachers)
    assert abs(got.item() - _reference(images, texts, 6.0, teachers, ensemble)) < 1e-6
    for gather in ("global", "local"):  # one process: every gather mode is the dense loss
        assert torch.equal(DistillLoss(gather, ensemble)(images, texts, scale, teachers), got)


def test_the_two_ensemble_forms_differ_for_several_teachers_and_agree_for_one():
    images, texts = _unit(6, 4, seed=0), _unit(6, 4, seed=1)
    one = [TeacherView(_unit(6, 3, seed=2), _unit(6, 3, seed=3), 11.0)]
    two = [*one, TeacherView(_unit(6, 5, seed=4), _unit(6, 5, seed=5), 4.0)]
    scale = torch.tensor(6.0, dtype=torch.float64)
    loss = {form: {n: DistillLoss("none", form)(images, texts, scale, teachers).item()
                   for n, teachers in (("one", one), ("two", two))} for form in ("probabilities", "logits")}
    assert loss["probabilities"]["one"] == loss["logits"]["one"]
    assert abs(loss["probabilities"]["two"] - loss["logits"]["two"]) > 1e-3
    # A student that is its one teacher has nothing to learn; the targets carry no gradient.
    assert DistillLoss("none")(images, texts, scale, [TeacherView(images, texts, 6.0)]).abs().item() < 1e-12
    student, target = images.clone().requires_grad_(), two[1].images.clone().requires_grad_()
    DistillLoss("none")(student, texts, scale, [one[0], TeacherView(target, two[1].texts, 4.0)]).backward()
    assert student.grad.abs().sum() > 0 and target.grad is None


# ---------------------------------------------------------------- views


def _samples(path: Path) -> list[dict]:
    with ShardOpener().open(str(path)) as stream:
        return [sample for _, sample in shard_samples(stream, SkipCounter())]


def test_a_view_is_its_record_crop_flip_and_jitter():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    plain = render_view(data, [5, 4, 37, 36, 0, 1, 1, 1, 0], 32)  # a 32 px box at 32 px: the pixels themselves
    assert torch.equal(plain, torch.from_numpy(pixels[4:36, 5:37]).permute(2, 0, 1))
    flipped = render_view(data, [5, 4, 37, 36, 1, 1, 1, 1, 0], 32)
    assert torch.equal(flipped, plain.flip(-1))
    darker = render_view(data, [5, 4, 37, 36, 0, 0.5, 1, 1, 0], 32)
    assert torch.equal(darker, (plain.float() * 0.5).to(torch.uint8))  # truncated, as torchvision does
    grey = render_view(data, [5, 4, 37, 36, 0, 1, 0, 1, 0], 32)  # contrast 0: the mean grey everywhere
    assert grey.unique().numel() == 1
    with pytest.raises(ValueError, match="outside"):
        render_view(data, [0, 0, 60, 10, 0, 1, 1, 1, 0], 32)
    draws = ViewRecipe(crop_scale_min=0.5, flip_prob=0.5, hue=0.1).draw(50, 40, 64, torch.Generator().manual_seed(0))
    assert draws.dtype == np.float32 and draws.shape == (64, 9)
    assert 0 < draws[:, 4].mean() < 1 and (draws[:, 5] != 1).any() and (draws[:, 8] == 0).any()
    assert np.abs(draws[:, 8]).max() <= 0.1 and (draws[:, 8] != 0).any()
    assert (ViewRecipe().draw(50, 40, 16, torch.Generator().manual_seed(0))[:, 8] == 0).all()  # no hue by default
    areas = (draws[:, 2] - draws[:, 0]) * (draws[:, 3] - draws[:, 1]) / (50 * 40)
    assert areas.min() >= 0.45 and areas.max() <= 1.0


@pytest.fixture(scope="module")
def written(tmp_path_factory, digits_dir, monkeypatch_module) -> dict:
    """Two shards of 40 digits each reinforced with 3 views and jitter on every one, with what the
    writer rendered for each (image, record) as it wrote them."""
    import tarfile

    import data_prep.reinforce as writer
    from data_prep.writer import add_member

    root = tmp_path_factory.mktemp("reinforce")
    (root / "data").mkdir()
    samples = _samples(digits_dir / "train" / "shard-000000.tar")[:80]
    for name, part in (("a-000.tar", samples[:40]), ("a-001.tar", samples[40:])):
        with tarfile.open(root / "data" / name, "w") as tar:
            for sample in part:
                for suffix, data in sample.items():
                    if suffix != "__key__":
                        add_member(tar, f"{sample['__key__']}.{suffix}", data)
    seen: dict = {}

    def recording(data, record, size):
        view = render_view(data, record, size)
        seen[(bytes(data), tuple(float(v) for v in record))] = view
        return view

    monkeypatch_module.setattr(writer, "render_view", recording)
    teachers = [str(digits_dir / "teacher"), str(digits_dir / "teacher2")]
    result = writer.reinforce_shards(teachers, str(root / "data"), root / "out", augmentations=3, captions=0,
                                     image_size=32, recipe=ViewRecipe(0.5, 0.5, 1.0, 1.0, hue=0.2), batch_size=100)
    return {"root": root, "seen": seen, "result": result, "teachers": teachers}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


class _EveryStoredView(torch.utils.data.Dataset):
    """(sample index, view index) -> the view rendered in a loader worker, as training does."""

    def __init__(self, samples):
        self.items = [(s, k) for s in samples for k in range(len(load_records(s)))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        sample, k = self.items[index]
        return render_view(sample_image_bytes(sample), load_records(sample)[k], 32)


def test_every_stored_view_replays_bitwise_in_a_loader_worker(written):
    samples = [s for p in sorted((written["root"] / "out").glob("*.tar")) for s in _samples(p)]
    dataset = _EveryStoredView(samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    replayed = list(loader)
    assert len(replayed) == 3 * len(samples) == len(written["seen"])
    for (sample, k), view in zip(dataset.items, replayed):
        key = (sample_image_bytes(sample), tuple(float(v) for v in load_records(sample)[k]))
        assert torch.equal(view, written["seen"][key])


def test_the_training_loader_replays_stored_views_with_the_teachers_rows_of_each(written, digits_dir):
    """Through the loader a run builds (2 workers): every image is one of its sample's stored views, as
    the writer rendered it, and each teacher's rows are its stored rows of that view and caption."""
    from clipx.config import load_config
    from clipx.data.batch import IMAGE, KEY, TEACHER_EMBEDDING
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter
    from clipx.methods import method_of

    out = written["root"] / "out"
    config = load_config(None, [f"model.name={digits_dir / 'teacher' / 'arch.json'}", f"data.train={out}",
                                "data.reinforced=true", "distill.embedded=true", "data.workers=2"])
    method = method_of(config)
    loader, _ = build_train_loader(config.data, 8, method.train_transform(config), method.collate(config), 0, 0, 1,
                                   SharedEpoch(), SkipCounter())
    by_key = {s["__key__"]: s for p in sorted(out.glob("*.tar")) for s in _samples(p)}
    chosen = []
    for batch in loader:
        for row, key in enumerate(batch[KEY]):
            sample = by_key[key]
            records = load_records(sample)
            views = [written["seen"][(sample_image_bytes(sample), tuple(float(v) for v in r))] for r in records]
            k = next(k for k, view in enumerate(views) if torch.equal(view, batch[IMAGE][row]))
            chosen.append(k)
            for t, embedded in enumerate(batch[TEACHER_EMBEDDING]):
                stored = np.load(io.BytesIO(sample[teacher_member(t)]))
                assert np.array_equal(embedded[row, 0].numpy(), stored[k])
                assert np.array_equal(embedded[row, 1].numpy(), stored[len(records)])  # its .txt caption
    assert len(chosen) >= 64 and set(chosen) == {0, 1, 2}  # every stored view is replayed


# ---------------------------------------------------------------- the two ensemble forms in training


def test_the_stored_and_the_online_ensemble_give_one_loss_at_step_one(digits_dir, tiny_model_json, tmp_path):
    """Two training runs of one seed on the reinforced shards: the teachers' stored float16 embeddings,
    and the teachers run in the loop on the replayed view (rounded as stored); with real and
    synthetic captions mixed, both ensemble forms, and MobileCLIP's convex weights."""
    from clipx.config import load_config
    from clipx.train.loop import train
    from tests.conftest import DEMO, tiny_overrides

    teachers = f"{digits_dir / 'teacher'},{digits_dir / 'teacher2'}"
    for ensemble in ("probabilities", "logits"):
        losses = {}
        for form, extra in (("stored", ["distill.embedded=true"]), ("online", [f"distill.teacher={teachers}"])):
            out = tmp_path / f"{ensemble}-{form}"
            base = tiny_overrides(digits_dir, tiny_model_json, out, **{
                "data.train": str(digits_dir / "train-reinforced"), "data.val": "null", "train.steps": 2,
                "data.reinforced": "true", "distill.ensemble": ensemble, "distill.weight": 0.7,
                "distill.student_weight": 0.3, "data.caption_keys": "{txt: 0.5, classname: 0.5}"})
            train(load_config(DEMO, base + extra))
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            losses[form] = [r for r in rows if r.get("kind") == "train"]
        first = {form: rows[0] for form, rows in losses.items()}
        assert first["stored"]["student_loss"] == first["online"]["student_loss"]
        assert abs(first["stored"]["distill_loss"] - first["online"]["distill_loss"]) < 1e-5
        assert abs(first["stored"]["loss"] - first["online"]["loss"]) < 1e-5
        expected = 0.3 * first["stored"]["student_loss"] + 0.7 * first["stored"]["distill_loss"]
        assert abs(first["stored"]["loss"] - expected) < 1e-5
        assert abs(losses["stored"][1]["loss"] - losses["online"][1]["loss"]) < 1e-4


# ---------------------------------------------------------------- the writer


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _reinforce(written, out: Path, *extra, check: bool = True, shards=None):
    return clipx_in_process("prep", "reinforce", "--teachers", ",".join(written["teachers"]), "--shards",
                            shards or written["root"] / "data", "--out", out, "--augmentations", 3, "--captions", 0,
                            "--image-size", 32, "--crop-scale-min", 0.5, "--jitter-prob", 1.0, "--hue", 0.2,
                            "--batch-size", 100,
                            *extra, check=check)


def test_every_member_is_kept_and_the_reinforced_ones_are_added(written):
    original = {s["__key__"]: s for p in sorted((written["root"] / "data").glob("*.tar")) for s in _samples(p)}
    out = written["root"] / "out"
    info = json.loads((out / "reinforce.json").read_text())
    assert [t["dim"] for t in info["teachers"]] == [24, 24] and info["augmentations"] == 3
    for path in sorted(out.glob("*.tar")):
        for sample in _samples(path):
            before = original[sample["__key__"]]
            assert {k: v for k, v in sample.items() if k not in (VIEWS_MEMBER, "json", "teacher0.npy", "teacher1.npy")} \
                == {k: v for k, v in before.items() if k != "json"}
            assert json.loads(sample["json"]) == {**json.loads(before["json"]), "synthetic_captions": []}
            for t in range(2):
                rows = np.load(io.BytesIO(sample[teacher_member(t)]))
                assert rows.dtype == np.float16 and rows.shape == (3 + 1, 24)
                assert np.allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1, atol=2e-3)
            assert not np.array_equal(np.load(io.BytesIO(sample["teacher0.npy"])),
                                      np.load(io.BytesIO(sample["teacher1.npy"])))
    result = written["result"]
    grown = sum((out / n).stat().st_size - (written["root"] / "data" / n).stat().st_size
                for n in ("a-000.tar", "a-001.tar"))
    # The files also round up to tar's 10 KiB records, once per shard.
    assert result["reinforced"] == len(original)
    assert abs(result["bytes_per_sample"] * len(original) - grown) <= 2 * 10240


def test_two_processes_and_a_resumed_run_write_the_bytes_one_writes(written, tmp_path, capsys):
    one = _shard_bytes(written["root"] / "out")
    _reinforce(written, tmp_path / "two", "--processes", 2)
    assert _shard_bytes(tmp_path / "two") == one
    (tmp_path / "two" / "a-001.tar").unlink()
    done = _reinforce(written, tmp_path / "two")
    assert "1 shards written (1 already there)" in done.stdout, done.stdout
    assert _shard_bytes(tmp_path / "two") == one
    refused = _reinforce(written, tmp_path / "two", "--augmentations", 2, check=False)
    assert refused.returncode != 0 and "augmentations=3" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_remote_shards_are_reinforced_as_the_local_ones(written, tmp_path, monkeypatch):
    from tests.netservers import apply_s3_env, s3_server, upload_folder

    apply_s3_env(monkeypatch)
    with s3_server() as endpoint:
        upload_folder(endpoint, "digits", written["root"] / "data", prefix="data")
        _reinforce(written, tmp_path / "s3", "--endpoint-url", endpoint, shards="s3://digits/data/a-{000..001}.tar")
    assert _shard_bytes(tmp_path / "s3") == _shard_bytes(written["root"] / "out")


def test_synthetic_captions_from_a_captioner_are_stored_and_embedded(written, tmp_path):
    from clipx.data.reinforce import stored_captions
    from tests.test_caption import write_random

    arch = tmp_path / "tiny.json"
    shutil.copy(Path(written["teachers"][0]) / "arch.json", arch)
    coca = write_random(tmp_path / "coca", arch, "loss.name=coca")
    _reinforce(written, tmp_path / "captioned", "--captioner", coca, "--captions", 2, "--max-tokens", 5)
    samples = [s for p in sorted((tmp_path / "captioned").glob("*.tar")) for s in _samples(p)]
    for sample in samples:
        synthetic = json.loads(sample["json"])["synthetic_captions"]
        assert len(synthetic) == 2 and all(isinstance(c, str) for c in synthetic)
        assert np.load(io.BytesIO(sample["teacher0.npy"])).shape == (3 + len(stored_captions(sample,
                                                                                             "synthetic_captions")), 24)
    # Sampled captions differ between draws; the views are those of the run without captions.
    assert any(len(set(json.loads(s["json"])["synthetic_captions"])) == 2 for s in samples)
    plain = {s["__key__"]: s for p in sorted((written["root"] / "out").glob("*.tar")) for s in _samples(p)}
    assert all(s[VIEWS_MEMBER] == plain[s["__key__"]][VIEWS_MEMBER] for s in samples)


@pytest.mark.parametrize("extra, message", [
    (("--augmentations", 0), "--augmentations must be at least 1"),
    (("--caption-key", "txt"), "--caption-key 'txt'"),
    (("--captions", 2, "--captioner", "{coca}", "--caption-method", "greedy"), "need --caption-method sample"),
    (("--crop-scale-min", 0), "--crop-scale-min must be in"),
    (("--captions", 1, "--captioner", "{coca}", "--temperature", 0), "temperature"),
])
def test_bad_writer_input_is_refused_in_one_line(written, tmp_path, extra, message):
    extra = tuple(str(v).replace("{coca}", str(tmp_path)) for v in extra)
    refused = _reinforce(written, tmp_path / "out", *extra, check=False)
    assert refused.returncode != 0 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.tar"))


def test_training_settings_it_cannot_honour_are_refused_in_one_line(digits_dir, tiny_model_json, tmp_path):
    from clipx.config import load_config
    from clipx.methods import method_of
    from tests.conftest import DEMO, tiny_overrides

    def refused(message, **extra):
        base = tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
            "data.train": str(digits_dir / "train-reinforced"), "data.reinforced": "true", **extra})
        with pytest.raises(ClipxError, match=message):
            config = load_config(DEMO, base)
            method = method_of(config)
            method.train_transform(config)

    refused("for loss.name=clip, coca, siglip, not slip", **{"loss.name": "slip"})
    refused("data.randaugment do not apply", **{"data.randaugment": "2,9"})
    refused("data.decode=device and", **{"data.decode": "device"})
    refused("the shards' views are 32 px", **{"model.name": str(_wider(tmp_path, tiny_model_json))})
    refused("no reinforce.json", **{"data.train": str(digits_dir / "train")})
    refused("empty path", **{"distill.teacher": f"{digits_dir / 'teacher'},"})


def _wider(tmp_path: Path, model_json: Path) -> Path:
    arch = json.loads(model_json.read_text())
    arch["vision_cfg"]["image_size"] = 64
    path = tmp_path / "64px.json"
    path.write_text(json.dumps(arch))
    return path


def test_a_caption_without_stored_embeddings_is_a_one_line_error(digits_dir, tiny_model_json, tmp_path):
    result = clipx_in_process("train", "--config", str(Path(__file__).parents[1] / "configs" / "demo-digits.yaml"),
                              *tiny_overrides_list(digits_dir, tiny_model_json, tmp_path), check=False)
    assert result.returncode != 0
    assert "may draw from txt and 'classname' only" in result.stderr.strip().splitlines()[-1]


def tiny_overrides_list(digits_dir, tiny_model_json, out):
    from tests.conftest import tiny_overrides

    return tiny_overrides(digits_dir, tiny_model_json, out, **{
        "data.train": str(digits_dir / "train-reinforced"), "data.reinforced": "true", "distill.embedded": "true",
        "data.val": "null", "data.caption_keys": "{txt: 1, negative: 1}"})


def test_without_distillation_the_views_are_replayed_all_the_same(written, digits_dir):
    """data.reinforced alone: the stored views, no teacher, the plain image-text collation."""
    from clipx.config import load_config
    from clipx.data.batch import IMAGE
    from clipx.data.pipeline import decode_or_reason
    from clipx.data.reinforce import ReplayedViews
    from clipx.methods import method_of

    out = written["root"] / "out"
    config = load_config(None, [f"model.name={digits_dir / 'teacher' / 'arch.json'}", f"data.train={out}",
                                "data.reinforced=true"])
    method = method_of(config)
    transform, collate = method.train_transform(config), method.collate(config)
    assert isinstance(transform, ReplayedViews) and not getattr(collate, "members", ())
    samples = _samples(out / "a-000.tar")[:8]
    views = [decode_or_reason(sample, transform)[0] for sample in samples]
    batch = collate([{"image": v, "text": "a digit", "key": s["__key__"]} for v, s in zip(views, samples)])
    for row, (view, sample) in enumerate(zip(views, samples)):
        record = tuple(float(v) for v in load_records(sample)[view.index])
        assert torch.equal(batch[IMAGE][row], written["seen"][(sample_image_bytes(sample), record)])
