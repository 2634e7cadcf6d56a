"""open_clip export round trip, the clipx.load API, and `clipx encode` to .npy and .parquet."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import clipx
from clipx.config import load_config
from clipx.data.transforms import decode_image
from clipx.errors import ClipxError
from tests.conftest import DEMO, clipx_in_process, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_dir, tiny_model_json):
    from clipx.train.loop import train

    out = tmp_path_factory.mktemp("trained")
    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, out, **{"train.steps": 3, "data.val": "null"})))
    return out


def digits_images(digits_dir, count: int = 6) -> list[Image.Image]:
    shard = sorted((digits_dir / "test").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:count]
    return [decode_image(data) for data in jpgs]


TEXTS = ["a handwritten seven.", "the digit zero, written by hand.", "a scan of the number four."]


def test_open_clip_export_loads_in_open_clip_and_gives_the_same_embeddings(run_dir, digits_dir, tmp_path):
    import open_clip

    export = tmp_path / "export"
    result = clipx_in_process("export", "--checkpoint", run_dir, "--format", "open_clip", "--out", export)
    assert result.returncode == 0, result.stderr
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    ours, preprocess, tokenizer = clipx.load(run_dir)
    theirs.eval()
    images = digits_images(digits_dir)
    our_pixels = torch.stack([preprocess(image) for image in images])
    their_pixels = torch.stack([their_preprocess(image) for image in images])
    assert torch.allclose(our_pixels, their_pixels, atol=1e-6)
    assert torch.equal(tokenizer(TEXTS), their_tokenizer(TEXTS))
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(our_pixels), theirs.encode_image(their_pixels, normalize=True),
                              atol=1e-5)
        assert torch.allclose(ours.encode_text(tokenizer(TEXTS)), theirs.encode_text(their_tokenizer(TEXTS),
                                                                                      normalize=True), atol=1e-5)
        assert torch.allclose(ours.logit_scale, theirs.logit_scale)


def test_hf_export_loads_as_clip_model_and_gives_the_same_embeddings(run_dir, digits_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    export = tmp_path / "hf"
    result = clipx_in_process("export", "--checkpoint", run_dir, "--format", "hf", "--out", export)
    assert result.returncode == 0, result.stderr
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.bin"))
    theirs = CLIPModel.from_pretrained(export).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(export)
    their_processor = CLIPImageProcessor.from_pretrained(export)
    ours, preprocess, tokenizer = clipx.load(run_dir)
    images = digits_images(digits_dir)
    tokens = their_tokenizer(TEXTS, padding="max_length", max_length=tokenizer.context_length, truncation=True,
                             return_tensors="pt")["input_ids"]
    assert torch.equal(tokens, tokenizer(TEXTS))
    pixels = their_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, torch.stack([preprocess(image) for image in images]), atol=1e-6)
    with torch.no_grad():
        out = theirs(input_ids=tokens, pixel_values=pixels)
        assert torch.allclose(out.image_embeds, ours.encode_image(pixels), atol=1e-5)
        assert torch.allclose(out.text_embeds, ours.encode_text(tokens), atol=1e-5)
        assert torch.allclose(theirs.logit_scale, ours.logit_scale)


def test_hf_export_refuses_what_clip_model_cannot_represent():
    from clipx.apps.export_hf import hf_config

    arch = {"embed_dim": 8, "vision_cfg": {"width": 16, "layers": 1, "attentional_pool": True}, "text_cfg": {}}
    with pytest.raises(ClipxError, match="attentional_pool"):
        hf_config(arch, 2.0)


def test_encode_writes_npy_and_parquet_rows_equal_to_the_api(run_dir, digits_dir, tmp_path):
    from clipx.apps.encode import encode

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    summary = encode(str(run_dir), str(tmp_path / "e.npy"), images=str(digits_dir / "test"), texts=str(texts),
                     batch_size=64, workers=0)
    matrix = np.load(tmp_path / "e.npy")
    index = json.loads((tmp_path / "e.npy.ids.json").read_text())
    assert summary["images"] == 360 and summary["texts"] == 3 and matrix.shape == (363, summary["dim"])
    assert index["kind"].count("image") == 360 and index["id"][-3:] == TEXTS
    model, _, tokenizer = clipx.load(run_dir)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(TEXTS)).numpy()
    assert np.allclose(matrix[-3:], expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    # Image files by glob, one of them broken: counted, the rest embedded; parquet output.
    for i, image in enumerate(digits_images(digits_dir, 3)):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "img9.png").write_bytes(b"<html>not an image</html>")
    result = clipx_in_process("encode", "--checkpoint", run_dir, "--images", tmp_path / "img*.png",
                              "--out", tmp_path / "e.parquet", "--workers", "0")
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert table["kind"] == ["image"] * 3 and table["id"] == [str(tmp_path / f"img{i}.png") for i in range(3)]
    assert json.loads(result.stdout)["unreadable_images"] == 1
    assert np.allclose(np.linalg.norm(np.array(table["embedding"]), axis=1), 1.0, atol=1e-5)


def test_encode_refuses_bad_requests_with_one_line(run_dir, tmp_path):
    from clipx.apps.encode import encode

    with pytest.raises(ClipxError, match="--out must end in"):
        encode(str(run_dir), str(tmp_path / "e.csv"), texts=str(tmp_path / "x"))
    with pytest.raises(ClipxError, match="matched no files"):
        encode(str(run_dir), str(tmp_path / "e.npy"), images=str(tmp_path / "none*.png"))
    assert not (tmp_path / "e.npy").exists()


def test_encode_in_bf16_writes_fp32_features_close_to_the_fp32_ones(run_dir, digits_dir, tmp_path):
    from clipx.apps.encode import encode

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    rows = {}
    for precision in ("fp32", "bf16"):
        summary = encode(str(run_dir), str(tmp_path / f"{precision}.npy"), images=str(digits_dir / "test"),
                         texts=str(texts), batch_size=64, workers=0, precision=precision)
        assert summary["precision"] == precision
        rows[precision] = np.load(tmp_path / f"{precision}.npy")
    assert rows["bf16"].dtype == np.float32 and rows["bf16"].shape == rows["fp32"].shape
    cosine = (rows["bf16"] * rows["fp32"]).sum(1) / np.linalg.norm(rows["bf16"], axis=1)
    assert cosine.min() > 0.99, cosine.min()
    assert not np.array_equal(rows["bf16"], rows["fp32"]), "bf16 changed nothing: autocast was not applied"
    with pytest.raises(ClipxError, match="precision 'fp16' is not one of fp32, bf16"):
        encode(str(run_dir), str(tmp_path / "x.npy"), texts=str(texts), precision="fp16")
