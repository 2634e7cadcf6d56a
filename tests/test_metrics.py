"""Metric functions on hand-made embeddings whose answers are known by construction."""

from pathlib import Path

import pytest
import torch

from eval.metrics import classification_metrics, retrieval_metrics


def test_classification_top1_top5_and_mean_per_class_recall():
    # 4 samples, 6 classes. Sample 0 and 1 right at top-1; sample 2 right only at rank 2; sample 3 never.
    logits = torch.tensor([
        [9.0, 1, 0, 0, 0, 0],   # label 0: rank 1
        [0.0, 9, 1, 0, 0, 0],   # label 1: rank 1
        [9.0, 8, 0, 0, 0, 0],   # label 1: rank 2
        [9.0, 8, 7, 6, 5, 0],   # label 5: rank 6 (outside top-5)
    ])
    labels = torch.tensor([0, 1, 1, 5])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(3 / 4)
    # class 0: 1/1, class 1: 1/2, class 5: 0/1 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_top5_with_fewer_than_five_classes_counts_all_classes():
    m = classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    assert m["top1"] == pytest.approx(0.5) and m["top5"] == pytest.approx(1.0)


def test_classification_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_retrieval_with_several_captions_per_image():
    # 3 images on the axes; 5 captions: image 0 has captions 0 and 1, image 1 has 2, image 2 has 3 and 4.
    images = torch.eye(3)
    texts = torch.tensor([
        [1.0, 0.0, 0.0],   # caption 0 -> image 0, exact
        [0.3, 0.9, 0.1],   # caption 1 -> image 0, but looks more like image 1: image 0 ranks second
        [0.0, 1.0, 0.0],   # caption 2 -> image 1, exact
        [0.0, 0.0, 1.0],   # caption 3 -> image 2, exact
        [0.6, 0.0, 0.8],   # caption 4 -> image 2
    ])
    texts = torch.nn.functional.normalize(texts, dim=-1)
    owners = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_metrics(images, texts, owners, ks=(1, 2, 10))
    # text->image: captions 0, 2, 3, 4 hit at R@1 (caption 4: 0.8 for image 2 vs 0.6); caption 1 hits at R@2.
    assert m["text_to_image"]["R@1"] == pytest.approx(4 / 5)
    assert m["text_to_image"]["R@2"] == pytest.approx(1.0)
    # image->text R@1: image 0 -> caption 0 (own); image 1 -> caption 2 (own); image 2 -> caption 3 (own).
    assert m["image_to_text"]["R@1"] == pytest.approx(1.0)
    assert m["image_to_text"]["R@10"] == pytest.approx(1.0)


def test_image_to_text_counts_any_of_the_captions():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # caption 0 belongs to image 0 but points at image 1
    owners = torch.tensor([0, 1])
    m = retrieval_metrics(images, texts, owners, ks=(1, 2))
    assert m["image_to_text"]["R@1"] == 0.0 and m["image_to_text"]["R@2"] == 1.0
    assert m["text_to_image"]["R@1"] == 0.0 and m["text_to_image"]["R@2"] == 1.0


def test_images_without_captions_do_not_count_for_image_to_text():
    images = torch.eye(3)
    texts = torch.eye(3)[:2]  # image 2 has no caption
    m = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(1,))
    assert m["image_to_text"]["R@1"] == 1.0


def test_templates_must_be_valid(tmp_path):
    from clipx.errors import ClipxError
    from clipx.templates import load_templates

    assert len(load_templates("imagenet")[0]) == 1000
    for body, message in [("classnames: [a\n", "not valid YAML"), ("- a\n- b\n", "non-empty lists"),
                          ("classnames: [a]\ntemplates: [3]\n", "exactly one"),
                          ("classnames: [a]\ntemplates: ['{0} {1}']\n", "exactly one"),
                          ("classnames: [a]\ntemplates: ['a {} of {}']\n", "exactly one")]:
        path = tmp_path / "t.yaml"
        path.write_text(body)
        with pytest.raises(ClipxError, match=message):
            load_templates(path)
    with pytest.raises(ClipxError, match="neither a file nor a shipped set"):
        load_templates("nonexistent-set")


def test_a_folder_named_like_a_shipped_set_is_not_taken_for_its_templates(tmp_path, monkeypatch):
    from clipx.templates import load_templates

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()  # a user's own photos/, beside `clipx prep photos`
    assert load_templates("photos") == load_templates(Path(__file__).parents[1] / "clipx" / "templates" / "photos.yaml")
    (tmp_path / "photos" / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "photos" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    assert load_templates("photos") == (["cat", "dog"], ["a photo of a {}."])


def test_merged_embeddings_are_ordered_by_key_and_deduplicated():
    from eval.embed import Embeddings, merge_embeddings

    def part(keys, owners):
        return Embeddings(torch.eye(4)[[int(k) for k in keys]], torch.tensor([int(k) for k in keys]), keys,
                          torch.eye(4)[[int(keys[o]) for o in owners]], torch.tensor(owners))

    merged = merge_embeddings([part(["2", "0"], [0, 1, 1]), part(["1", "0"], [0, 1])])
    assert merged.keys == ["0", "1", "2"]  # "0" read by both ranks counts once
    assert merged.labels.tolist() == [0, 1, 2]
    assert merged.text_to_image.tolist() == [0, 0, 1, 2]  # captions follow their images, in order
    assert torch.equal(merged.text_features, torch.eye(4)[[0, 0, 1, 2]])
