"""Text-only contrastive training (loss.name: simcse): the loss against SimCSE's formula written as
loops, the text pairs a batch carries, dropout as the only augmentation, training on caption-only
shards that makes the tower beat its untrained self on held-out sentence similarity, the sentence
evaluators' command line and the sentence-transformers export. Exactness on 2 and 3 processes and
bitwise resume are the combination matrix's (tests/test_matrix.py)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.losses import ClipLoss
from tests.conftest import REPO, clipx_in_process, tiny_overrides

SIMCSE = REPO / "configs" / "simcse-sentences.yaml"


def simcse_reference(anchors, positives, temperature, negatives=()) -> float:
    """Gao et al. 2021, Eq. 1 (and Eq. 5 with hard negatives), averaged over the anchors: for anchor i,
    -log(exp(cos(h_i, h_i+)/t) / (sum_j exp(cos(h_i, h_j+)/t) + sum_k exp(cos(h_i, h_k-)/t)))."""
    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total = 0.0
    for i, anchor in enumerate(anchors):
        scores = [math.exp(cos(anchor, p) / temperature) for p in positives]
        scores += [math.exp(cos(anchor, n) / temperature) for n in negatives]
        total += -math.log(scores[i] / sum(scores))
    return total / len(anchors)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
@pytest.mark.parametrize("gather", ["none", "global", "local"])
def test_the_loss_is_simcses_formula(gather, temperature):
    generator = torch.Generator().manual_seed(0)
    anchors, positives = (torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    negatives = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    loss = ClipLoss(gather, symmetric=False)
    scale = torch.tensor(1 / temperature, dtype=torch.float64)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    plain = loss(unit(anchors), unit(positives), scale)
    assert abs(plain.item() - simcse_reference(anchors.tolist(), positives.tolist(), temperature)) < 1e-6
    hard = loss(unit(anchors), unit(positives), scale, negatives=unit(negatives), negative_mask=mask)
    expected = simcse_reference(anchors.tolist(), positives.tolist(), temperature, negatives[mask].tolist())
    assert abs(hard.item() - expected) < 1e-6
    assert hard.item() > plain.item()  # hard negatives only add columns


def test_a_text_pair_batch_pairs_each_caption_with_its_positive_or_itself():
    from clipx.data.batch import POSITIVE_TEXT, TEXT, TextPairBatch
    from clipx.data.captions import CaptionChooser

    collate = TextPairBatch(lambda texts: torch.tensor([[len(t)] for t in texts]), CaptionChooser(positive_key="pos.txt"))
    chooser = collate.choose_caption
    samples = [{"txt": b"a cat", "pos.txt": b"a kitten\n"}, {"txt": b"a dog sleeps"}]
    picked = [{"key": str(i), "text": chooser(s, i), "positive": chooser.positive(s, i)} for i, s in enumerate(samples)]
    batch = collate(picked)
    assert batch[TEXT].tolist() == [[5], [12]]
    assert batch[POSITIVE_TEXT].tolist() == [[8], [12]]  # "a kitten"; the second sample paired with itself
    json_pairs = CaptionChooser(positive_key="paraphrase")
    assert json_pairs.positive({"json": b'{"paraphrase": ["x", "y"]}'}, 3) in ("x", "y")
    assert json_pairs.positive({"json": b'{"other": "x"}'}, 3) is None


def test_dropout_is_the_only_difference_between_two_passes_of_a_sentence(tiny_model_json):
    from clipx.methods import build_model

    config = load_config(SIMCSE, [f"model.name={tiny_model_json}", "model.text_dropout=0.2"])
    model = build_model(config)
    plain = load_config(SIMCSE, [f"model.name={tiny_model_json}", "model.text_dropout=0"])
    assert model.state_dict().keys() == build_model(plain).state_dict().keys()  # the hooks hold no weights
    tokens = torch.randint(1, 400, (4, 16))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("overrides, message", [
    (["loss.name=clip", "model.text_dropout=0.1"], "model.text_dropout"),
    (["model.lock_image=true"], "text tower alone"),
    (["data.randaugment=2,9"], "text tower alone"),
    (["model.text_tower=hf", "model.hf_text_path=/tmp", "model.text_dropout=0.1"], "transformers tower"),
    (["model.text_dropout=1.5"], "[0, 1)"),
    (["loss.name=simcse", "ssl.mix=mixup"], "i-Mix"),
])
def test_what_text_only_training_cannot_do_is_refused_in_one_line(overrides, message, tiny_model_json):
    from clipx.methods import method_of

    with pytest.raises(ClipxError, match=message.replace("[", r"\[").replace(")", r"\)")) as error:
        method_of(load_config(SIMCSE, [f"model.name={tiny_model_json}", *overrides]))
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> Path:
    from data_prep.sentences import prep_sentences

    out = tmp_path_factory.mktemp("sentences")
    prep_sentences(out, pairs=True, samples=3000, shard_size=500, sts_pairs=600)
    return out


@pytest.fixture(scope="module")
def trained(sentences, tiny_model_json, tmp_path_factory) -> Path:
    from clipx.train.loop import train

    out = tmp_path_factory.mktemp("simcse") / "run"
    overrides = tiny_overrides(sentences, tiny_model_json, out, **{
        "data.val": "null", "train.steps": 30, "train.batch_size": 32, "train.warmup_steps": 3,
        "train.checkpoint_every": 30})
    return Path(train(load_config(SIMCSE, overrides))["checkpoint"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return clipx_in_process(*args)


def test_training_on_caption_only_shards_beats_the_untrained_tower_on_held_out_similarity(
        trained, sentences, tiny_model_json, tmp_path):
    """Supervised SimCSE on paraphrase pairs of the training templates and classes, scored on held-out
    templates x held-out classes: 30 steps lift STS Spearman well above the tower as built."""
    from clipx.apps.text_eval import sentence_encoder
    from clipx.data.tokenizer import Tokenizer
    from clipx.methods import build_model
    from eval.text_similarity import read_sts_tsv, sts_metrics

    result = _cli("eval", "sts", "--checkpoint", str(trained), "--data", str(sentences / "sts.tsv"),
                  "--out", str(tmp_path / "sts.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads((tmp_path / "sts.json").read_text())["sts"]["spearman"]
    config = load_config(trained / "config.yaml")
    torch.manual_seed(config.train.seed)  # the tower as the run built it
    encode = sentence_encoder(build_model(config).eval(), Tokenizer(config.model), "cpu")
    before = sts_metrics(encode, read_sts_tsv(sentences / "sts.tsv"))["spearman"]
    assert after > before + 0.15, (before, after)
    result = _cli("eval", "text-retrieval", "--checkpoint", str(trained), "--data", str(sentences / "retrieval.tsv"),
                  "--out", str(tmp_path / "retrieval.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    recall = json.loads((tmp_path / "retrieval.json").read_text())["text_retrieval"]["query_to_positive"]
    assert 0.0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= 1.0


def test_sentence_evaluation_and_exports_refuse_what_they_cannot_do_in_one_line(trained, sentences, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\t1\nc\td\n")
    for args in (("eval", "sts", "--checkpoint", str(trained), "--data", str(bad), "--out", str(tmp_path / "x.json")),
                 ("export", "--checkpoint", str(trained), "--format", "open_clip", "--out", str(tmp_path / "oc")),
                 ("export", "--checkpoint", str(trained), "--format", "sentence-transformers",
                  "--out", str(tmp_path / "st")),
                 ("encode", "--checkpoint", str(trained), "--images", str(sentences / "*.png"),
                  "--out", str(tmp_path / "e.npy"))):
        result = _cli(*args)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "st").exists()


def test_a_minilm_tower_exports_as_a_sentence_transformers_folder_that_mean_pooling_reproduces(
        sentences, tiny_model_json, tmp_path):
    """Mean pooling of the exported transformers model over its attention mask, then the Dense
    layer and normalisation, gives clipx's embeddings to 1e-5."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    import clipx
    from clipx.train.loop import train
    from tests.matrix.runner import minilm_path

    overrides = tiny_overrides(sentences, tiny_model_json, tmp_path / "run", **{
        "data.val": "null", "train.steps": 2, "train.batch_size": 8, "train.warmup_steps": 0,
        "model.text_tower": "hf", "model.hf_text_path": minilm_path(), "model.text_dropout": "null",
        "train.checkpoint_every": 2})
    checkpoint = train(load_config(SIMCSE, overrides))["checkpoint"]
    result = _cli("export", "--checkpoint", checkpoint, "--format", "sentence-transformers",
                  "--out", str(tmp_path / "st"))
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "st"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True

    sentences_ = ["a photo of the cool jay.", "a rendering of a great grey owl, seen from far away."]
    model, _, tokenize = clipx.load(checkpoint)
    expected = model.encode_text(tokenize(sentences_))
    encoder, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(sentences_, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**encoded).last_hidden_state  # (2, L, H)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    dense = load_file(str(folder / "2_Dense" / "model.safetensors"))["linear.weight"]
    exported = F.normalize(pooled @ dense.T, dim=-1)
    assert (exported - expected).abs().max().item() < 1e-5


def test_a_clips_text_tower_initialises_the_text_encoder(tiny_model_json, tmp_path):
    """model.pretrained takes a CLIP's text tower (its image tower and temperature are left out)."""
    from safetensors.torch import save_file

    from clipx.methods import build_model
    from clipx.models import create_model
    from clipx.models.pretrained import init_from_pretrained

    config = load_config(SIMCSE, [f"model.name={tiny_model_json}"])
    clip = create_model(config.model)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    encoder = build_model(config)
    assert not torch.equal(encoder.text.token_embedding.weight, clip.text.token_embedding.weight)
    init_from_pretrained(encoder, tmp_path / "clip.safetensors", config.model.text_tower)
    tokens = torch.randint(1, 400, (3, 16))
    encoder.eval()
    assert torch.equal(encoder(tokens), clip.eval().encode_text(tokens))
