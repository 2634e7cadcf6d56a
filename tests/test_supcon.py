"""Supervised contrastive learning (loss.name: supcon): the loss against the paper's L_out written as
loops (on one and on 2 processes), its fall-back to instance positives, labels in views batches, and
a short training run on the digits that resumes bitwise."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.losses import NTXentLoss, SupConLoss
from tests.conftest import REPO, tiny_overrides

SUPCON = REPO / "configs" / "supcon-digits.yaml"
SIMCLR = REPO / "configs" / "simclr-digits.yaml"


def supcon_reference(z1: list[list[float]], z2: list[list[float]], labels: list[int], temperature: float) -> float:
    """Khosla et al. 2020, Eq. 2 (L_out), averaged over the 2B anchors: for anchor i, -1/|P(i)| times
    the sum over its positives p of log(exp(z_i.z_p/t) / sum over a != i of exp(z_i.z_a/t)), z
    unit-normalised. P(i): the other views of i's class; for an unlabelled i (-1), its other view."""
    views, n = z1 + z2, len(z1)
    view_labels = labels + labels

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    views = [unit(v) for v in views]

    def sim(i, j):
        return sum(x * y for x, y in zip(views[i], views[j])) / temperature

    total = 0.0
    for i in range(2 * n):
        denominator = sum(math.exp(sim(i, a)) for a in range(2 * n) if a != i)
        if view_labels[i] < 0:
            positives = [(i + n) % (2 * n)]
        else:
            positives = [p for p in range(2 * n) if p != i and view_labels[p] == view_labels[i]]
        total += -sum(math.log(math.exp(sim(i, p)) / denominator) for p in positives) / len(positives)
    return total / (2 * n)


LABELS = [  # labelled, partly labelled, every sample its own class, one class for all
    [0, 1, 0, 2, 1, 0],
    [0, -1, 0, 3, -1, 3],
    [5, 4, 3, 2, 1, 0],
    [7, 7, 7, 7, 7, 7],
]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("labels", LABELS, ids=["labelled", "partly", "distinct", "one-class"])
def test_supcon_equals_the_papers_formula(labels, temperature):
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=generator, dtype=torch.float64)  # not normalised: the loss normalises
    z2 = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    loss = SupConLoss(temperature)(z1, z2, torch.tensor(labels))
    assert loss.dtype == torch.float64
    assert abs(loss.item() - supcon_reference(z1.tolist(), z2.tolist(), labels, temperature)) <= 1e-6


@pytest.mark.parametrize("labels", [None, [-1] * 6, [5, 4, 3, 2, 1, 0]], ids=["none", "all-minus-one", "distinct"])
def test_without_shared_labels_supcon_is_ntxent(labels):
    """Every sample unlabelled (or of its own class): the only positive is the other view, NT-Xent's."""
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    supcon = SupConLoss(0.2)(z1, z2, None if labels is None else torch.tensor(labels))
    grads = torch.autograd.grad(supcon, (z1, z2))
    ntxent = NTXentLoss(0.2)(z1, z2)
    expected = torch.autograd.grad(ntxent, (z1, z2))
    torch.testing.assert_close(supcon, ntxent, rtol=0, atol=1e-12)
    for actual, wanted in zip(grads, expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-12)


def test_an_unlabelled_sample_is_a_class_of_its_own():
    """-1 is no class: unlabelled samples are positives neither of labelled ones nor of each other,
    so relabelling each with a fresh class changes nothing."""
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    unlabelled = SupConLoss(0.1)(z1, z2, torch.tensor([0, -1, 0, -1, -1, 1]))
    fresh = SupConLoss(0.1)(z1, z2, torch.tensor([0, 7, 0, 8, 9, 1]))
    torch.testing.assert_close(unlabelled, fresh, rtol=0, atol=1e-14)
    assert (SupConLoss(0.1)(z1, z2, torch.tensor([0, 0, 0, 0, 0, 1])) - fresh).abs() > 1e-3


def test_gather_modes_agree_on_one_process():
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(LABELS[1])
    results = []
    for gather in ("none", "local", "global"):
        loss = SupConLoss(0.3, gather)(z1, z2, labels)
        results.append((loss, *torch.autograd.grad(loss, (z1, z2))))
    for other in results[1:]:
        for actual, expected in zip(other, results[0]):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-14)


def test_two_processes_equal_the_formula_and_one_process_on_the_union_batch(tmp_path):
    """Each rank holds half of the pairs (classes spread over both halves); local and global gather
    give the paper's loss on the union batch, and DDP's averaged gradients equal one process's; none
    gives the mean of the two halves' own losses."""
    from tests.distributed.cases import GLOBAL_BATCH, SUPCON_LABELS
    from tests.distributed.launch import run_two_processes

    ranks = run_two_processes("supcon", tmp_path)
    generator = torch.Generator().manual_seed(0)  # tests/distributed/cases.py:paired_halves
    z1 = torch.randn(GLOBAL_BATCH, 6, generator=generator).double().requires_grad_()
    z2 = torch.randn(GLOBAL_BATCH, 6, generator=generator).double().requires_grad_()
    labels = torch.tensor(SUPCON_LABELS)
    expected = SupConLoss(0.2)(z1, z2, labels)
    expected.backward()
    reference = supcon_reference(z1.tolist(), z2.tolist(), list(SUPCON_LABELS), 0.2)
    assert abs(expected.item() - reference) <= 1e-6
    half = GLOBAL_BATCH // 2
    for gather in ("local", "global"):
        assert abs((sum(r[gather]["loss"] for r in ranks) / 2).item() - reference) <= 1e-6, gather
        for rank, r in enumerate(ranks):
            rows = slice(rank * half, (rank + 1) * half)
            # Each rank's inputs receive the gradient of the sum of both ranks' losses: /2 is DDP's average.
            torch.testing.assert_close(r[gather]["grad_z1"] / 2, z1.grad[rows], rtol=0, atol=1e-12)
            torch.testing.assert_close(r[gather]["grad_z2"] / 2, z2.grad[rows], rtol=0, atol=1e-12)
    halves = [supcon_reference(z1[rows].tolist(), z2[rows].tolist(), list(SUPCON_LABELS[rows]), 0.2)
              for rows in (slice(0, half), slice(half, None))]
    assert abs((sum(r["none"]["loss"] for r in ranks) / 2).item() - sum(halves) / 2) <= 1e-6


def test_the_label_reader_keeps_unlabelled_samples_as_minus_one():
    from clipx.data.batch import LABEL, VIEWS, LabelledViewsBatch
    from clipx.data.labels import LabelReader

    read = LabelReader("label", classes=None, unlabelled=-1)
    assert read({"json": b'{"label": 7}'}) == 7
    assert read({"cls": b"3\n"}) == 3
    assert read({"json": b'{"classname": "seven"}'}) == -1  # no label: kept, as an instance
    assert read({"txt": b"a caption"}) == -1
    assert read({"json": b'{"label": -1}'}) == -1
    assert read({"json": b'{"label": "seven"}'}) is None  # malformed: skipped (no_class_label)
    classifier = LabelReader("label", [3, 7])  # a classifier's reader is unchanged: rows, None to skip
    assert (classifier({"cls": b"7"}), classifier({"cls": b"5"}), classifier({"txt": b""})) == (1, None, None)

    samples = [{"key": str(i), "image": [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)], "label": label}
               for i, label in enumerate([2, -1, 0])]
    batch = LabelledViewsBatch(read)(samples)
    assert batch[LABEL].tolist() == [2, -1, 0] and batch[LABEL].dtype == torch.long
    assert [v.shape for v in batch[VIEWS]] == [(3, 3, 4, 4)] * 2


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"]


def test_supcon_trains_and_resumes_bitwise_on_the_digits(tmp_path, digits_dir, tiny_model_json):
    """configs/supcon-digits.yaml for 4 steps reads every digit's label; a run resumed from step 2
    ends with the unbroken run's weights."""
    from clipx.train.loop import train

    extra = {"train.steps": 4, "train.checkpoint_every": 2, "data.val": "null", "ssl.head_hidden": 32,
             "ssl.head_out": 16}
    full = tmp_path / "full"
    summary = train(load_config(SUPCON, tiny_overrides(digits_dir, tiny_model_json, full, **extra)))
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    records = _losses(full)
    assert all(r["labelled_fraction"] == 1.0 for r in records), records

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000002", resumed / "checkpoints" / "step-000000002")
    train(load_config(SUPCON, tiny_overrides(digits_dir, tiny_model_json, resumed, **extra)), resume="latest")
    expected = load_file(full / "checkpoints" / "step-000000004" / "model.safetensors")
    actual = load_file(resumed / "checkpoints" / "step-000000004" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_samples_without_a_label_are_trained_on_as_simclr_would(tmp_path, digits_dir, tiny_model_json):
    """A label key no sample has: nothing is skipped, every sample is unlabelled, and the run's
    losses are SimCLR's on the same stream and initial weights."""
    from clipx.train.loop import train

    extra = {"train.steps": 2, "data.val": "null", "ssl.head_hidden": 32, "ssl.head_out": 16}
    supcon = train(load_config(SUPCON, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "supcon", **{
        **extra, "eval.label_key": "no_such_field"})))
    simclr = train(load_config(SIMCLR, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "simclr", **extra)))
    assert supcon["steps"] == simclr["steps"] == 2
    ours, theirs = _losses(tmp_path / "supcon"), _losses(tmp_path / "simclr")
    assert all(r["labelled_fraction"] == 0.0 for r in ours)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-5)
