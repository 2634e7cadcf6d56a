"""`clipx caption`: a captioner's caption of every sample written into copies of its shards (members
byte for byte, the caption as a .json field), the same for any number of processes, resumable, from
a clipx CoCa checkpoint or its open_clip folder alike, and read back by training's caption sources."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from clipx.config import dump_config, load_config
from clipx.data.opener import ShardOpener
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples
from tests.conftest import TINY_ARCH, clipx_in_process

KEY = "synthetic_caption"
FAST = ("--batch-size", 8, "--max-tokens", 6)  # several batches per shard; short captions


def write_random(out: Path, arch: Path, *overrides: str) -> Path:
    """A clipx checkpoint of a seeded random model (config.yaml + model.safetensors)."""
    from safetensors.torch import save_file

    from clipx.methods import build_model

    out.mkdir(parents=True)
    config = load_config(None, [f"model.name={arch}", *overrides])
    torch.manual_seed(3)
    save_file(build_model(config).state_dict(), str(out / "model.safetensors"))
    dump_config(config, out / "config.yaml")
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits_dir) -> dict:
    """Two small shards of digits (a sample with a broken image, one without a .json, one whose .json is
    a list), a random tiny CoCa checkpoint, and the greedy captioning of those shards by it."""
    from data_prep.writer import add_member

    root = tmp_path_factory.mktemp("caption")
    with ShardOpener().open(str(digits_dir / "test" / "shard-000000.tar")) as stream:
        samples = [s for _, s in zip(range(33), (s for _, s in shard_samples(stream, SkipCounter())))]
    samples[3]["jpg"] = b"not an image"
    del samples[5]["json"]
    samples[25]["json"] = b"[1, 2]"
    (root / "data").mkdir()
    for name, part in (("a-000.tar", samples[:20]), ("a-001.tar", samples[20:])):
        with tarfile.open(root / "data" / name, "w") as tar:
            for sample in part:
                for suffix, data in sample.items():
                    if suffix != "__key__":
                        add_member(tar, f"{sample['__key__']}.{suffix}", data)
    arch = root / "tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    coca = write_random(root / "coca", arch, "loss.name=coca")
    greedy = caption(coca, root / "data", root / "greedy")
    return {"root": root, "arch": arch, "data": root / "data", "coca": coca, "greedy": root / "greedy",
            "greedy_stdout": greedy.stdout}


def caption(checkpoint: Path, data: Path, out: Path, *extra, check: bool = True):
    return clipx_in_process("caption", "--checkpoint", checkpoint, "--data", data, "--out", out, *FAST, *extra,
                            check=check)


def read(path: Path) -> list[dict]:
    with ShardOpener().open(str(path)) as stream:
        return [sample for _, sample in shard_samples(stream, SkipCounter())]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def direct_captions(checkpoint: Path, images: list[bytes]) -> list[str]:
    """Greedy captions of ``images`` by the checkpoint's model through generate() itself."""
    from open_clip.tokenizer import SimpleTokenizer

    from clipx.api import load_model
    from clipx.data.transforms import decode_image, eval_transform
    from clipx.models import image_size
    from clipx.models.decoding import generate

    model, config = load_model(checkpoint)
    m = config.model
    transform = eval_transform(image_size(m), m.image_mean, m.image_std)
    with torch.no_grad():
        context = model.image_context(torch.stack([transform(decode_image(data)) for data in images]))
        rows = generate(lambda tokens, source: model.next_token_logits(context[source], tokens), len(images),
                        sot=49406, eot=49407, pad=0, max_tokens=6, method="greedy")
    tokenizer = SimpleTokenizer()
    out = []
    for row in rows.tolist():
        ids = row[1:row.index(49407)] if 49407 in row else row[1:]
        out.append(tokenizer.decode(ids).strip())
    return out


def test_every_member_is_copied_and_the_caption_is_what_generate_gives(made):
    assert "2 shards written, 0 skipped as done; 31 samples captioned, 1 without an image, 1 whose .json is " \
           "not an object" in made["greedy_stdout"]
    assert sorted(p.name for p in made["greedy"].iterdir()) == ["a-000.tar", "a-001.tar", "caption.json", "sizes.json"]
    assert json.loads((made["greedy"] / "sizes.json").read_text()) == {"a-000.tar": 20, "a-001.tar": 13}
    settings = json.loads((made["greedy"] / "caption.json").read_text())
    assert settings["checkpoint"] == str(made["coca"].resolve()) and settings["method"] == "greedy"
    assert settings["key"] == KEY and settings["max_tokens"] == 6
    for name in ("a-000.tar", "a-001.tar"):
        before, after = read(made["data"] / name), read(made["greedy"] / name)
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        captions = []
        for old, new in zip(before, after):
            unchanged = old["jpg"] == b"not an image" or old.get("json") == b"[1, 2]"
            if unchanged:
                assert new == old
                continue
            assert list(new) == list(old) + ([] if "json" in old else ["json"])  # members in their order
            assert {k: v for k, v in new.items() if k != "json"} == {k: v for k, v in old.items() if k != "json"}
            meta = json.loads(new["json"])
            captions.append(meta.pop(KEY))
            assert meta == (json.loads(old["json"]) if "json" in old else {})
        usable = [s["jpg"] for s in before if s["jpg"] != b"not an image" and s.get("json") != b"[1, 2]"]
        assert captions == direct_captions(made["coca"], usable)
    assert len(set(captions)) > 1  # the images differ, and so do their captions


def test_two_processes_write_the_bytes_one_writes(made, tmp_path):
    sample = ("--method", "sample", "--seed", 5, "--top-k", 50)
    caption(made["coca"], made["data"], tmp_path / "one", *sample)
    caption(made["coca"], made["data"], tmp_path / "two", *sample, "--processes", 2)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    assert one == {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert shard_bytes(tmp_path / "one") != shard_bytes(made["greedy"])  # sampled, not the argmax


def test_a_rerun_writes_only_the_missing_shard_and_refuses_other_settings(made, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(made["greedy"], out)
    first = (out / "a-000.tar").stat().st_mtime_ns
    (out / "a-001.tar").unlink()
    (out / "sizes.json").unlink()
    result = caption(made["coca"], made["data"], out)
    assert "1 shards written, 1 skipped as done" in result.stdout
    assert (out / "a-000.tar").stat().st_mtime_ns == first
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in made["greedy"].iterdir()}
    assert caption(made["coca"], made["data"], out, "--beams", 2).returncode == 0  # beams do not change greedy
    refused = caption(made["coca"], made["data"], out, "--method", "beam", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "method='greedy'" in refused.stderr and "another --out" in refused.stderr


def test_an_exported_open_clip_coca_folder_captions_as_its_clipx_checkpoint(made, tmp_path):
    from clipx.apps.export import export_open_clip

    # clipx export writes the CoCa's arch with its multimodal_cfg: open_clip builds its CoCa from it.
    folder = export_open_clip(made["coca"], tmp_path / "open_clip")
    caption(folder, made["data"], tmp_path / "out")
    assert shard_bytes(tmp_path / "out") == shard_bytes(made["greedy"])


def test_a_model_without_a_decoder_and_bad_input_are_refused_in_one_line(made, tmp_path):
    from clipx.apps.export import export_open_clip

    root = made["root"]
    clip = write_random(tmp_path / "clip", made["arch"])
    siglip2 = ["loss.name=siglip2", "model.init_logit_bias=-10", "model.init_temperature=0.1"]
    no_decoder = write_random(tmp_path / "nodec", made["arch"], *siglip2, "loss.siglip2.decoder_weight=0")
    cases = [
        ((clip, made["data"], tmp_path / "o1"), "is a loss.name=clip model without a text decoder; caption with a coca"),
        ((no_decoder, made["data"], tmp_path / "o2"), "trained without its decoder"),
        ((export_open_clip(clip, tmp_path / "oc"), made["data"], tmp_path / "o3"), "open_clip model without a text"),
        ((tmp_path / "nowhere", made["data"], tmp_path / "o4"), "is not a directory"),
        ((made["coca"], root / "nothing-*.tar", tmp_path / "o5"), "--data"),
        ((made["coca"], made["data"], tmp_path / "o6", "--processes", 0), "--processes must be at least 1"),
        ((made["coca"], made["data"], made["data"]), "holds the input shards"),
        ((made["coca"], made["data"], tmp_path / "o7", "--key", "txt"), "--key 'txt'"),
        ((made["coca"], made["data"], tmp_path / "o8", "--max-tokens", 16), "use at most 15"),
    ]
    for args, message in cases:
        result = caption(*args, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    with_decoder = write_random(tmp_path / "siglip2", made["arch"], *siglip2)
    caption(with_decoder, made["data"], tmp_path / "siglip2-out", "--method", "beam", "--beams", 2)
    assert KEY in json.loads(read(tmp_path / "siglip2-out" / "a-000.tar")[0]["json"])


def test_training_reads_the_new_caption_key(made):
    from clipx.data.captions import CaptionChooser

    sample = read(made["greedy"] / "a-000.tar")[0]
    generated = json.loads(sample["json"])[KEY]
    assert CaptionChooser({KEY: 1.0})(sample, 0) == generated
    mixed = CaptionChooser({"txt": 0.5, KEY: 0.5})
    assert {mixed(sample, seed) for seed in range(20)} == {generated, sample["txt"].decode().strip()}


@pytest.mark.parametrize("method", ["coca", "siglip2"])
def test_an_export_loads_in_open_clip_and_embeds_as_clipx_does(made, tmp_path, method):
    """CoCa exports as open_clip's CoCa (decoder included), SigLIP 2 as a SigLIP (decoder, heads and
    teacher left out): open_clip's model embeds images and texts as clipx's does."""
    import open_clip

    from clipx.api import load_model
    from clipx.apps.export import export_open_clip

    extra = ["model.init_logit_bias=-10"] if method == "siglip2" else []
    checkpoint = write_random(tmp_path / method, made["arch"], f"loss.name={method}", *extra)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_open_clip(checkpoint, tmp_path / 'oc')}")
    ours, _ = load_model(checkpoint)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 400, (3, 16))
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images, normalize=True), ours.encode_image(images))
        torch.testing.assert_close(theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens))
    assert (type(theirs).__name__ == "CoCa") == (method == "coca")
