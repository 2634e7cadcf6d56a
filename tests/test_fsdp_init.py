"""A sharded model's initial weights are materialised per rank (clipx/train/sharded_init.py): each rank's
rows equal the eager single-process build's rows bitwise, and model.pretrained is read shard by shard.

One 2-process launch (``python -m torch.distributed.run --nproc_per_node 2 -m tests.test_fsdp_init OUT
DATA``) builds three sharded trainers with ``build_trainer`` and checks each rank's parameters and
buffers against an eager build of the same seed in the same process: CLIP with an EMA and a locked,
LoRA-adapted text tower; CLIP initialised from an open_clip safetensors file (its reads recorded: a rank
may read only its own rows of a sharded tensor); SimCLR, whose projection head holds BatchNorm units;
and a ResNet-tower CLIP from a pretrained file (BatchNorm's buffers, 0-dim counters included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.matrix.combos import TINY_RESNET, TINY_VIT

CASES = {
    "clip-ema-lora-lock": {"loss.name": "clip", "train.ema_decay": 0.9, "model.lora_rank": 4, "model.lock_text": True},
    "clip-pretrained": {"loss.name": "clip", "model.pretrained": "{out}/pretrained.safetensors"},
    "simclr-batchnorm": {"loss.name": "ntxent", "ssl.head_hidden": 32, "ssl.head_out": 16},
    # A ResNet image tower's BatchNorm buffers, 0-dim counters included, from a pretrained file.
    "resnet-pretrained": {"loss.name": "clip", "model.name": "{out}/arch-resnet.json",
                          "model.pretrained": "{out}/pretrained-resnet.safetensors"},
}


def config_of(name: str, out: Path, data: Path):
    from clipx.config import load_config

    values = {"model.name": str(out / "arch.json"), "data.train": str(data / "train"), "data.val": "null",
              "data.workers": 0, "train.batch_size": 4, "train.steps": 1, "train.threads": 1, "train.seed": 7,
              "train.sharding": "fsdp", "train.output_dir": str(out / f"run-{name}"),
              **{k: v.format(out=out) if isinstance(v, str) else v for k, v in CASES[name].items()}}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def check_case(name: str, out: Path, data: Path, reads: list) -> dict:
    """This rank's verdict on case ``name``: tensors whose rows differ from the eager build's."""
    from accelerate.utils import set_seed

    from clipx.train.build import build_model_eagerly, build_trainer
    from clipx.train.sharded_init import own_rows
    from clipx.train.sharding import local_part, scalars_to_vectors_

    config = config_of(name, out, data)
    reads.clear()
    trainer = build_trainer(config)
    model = trainer.model
    set_seed(config.train.seed)
    eager = build_model_eagerly(trainer.method, config, trainer.accelerator)
    scalars_to_vectors_(eager)
    reference = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    differ, flags = [], []
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        rows = own_rows(tensor.shape[0], tensor) if tensor.ndim else slice(None)
        expected = reference[key][rows] if tensor.ndim else reference[key]
        if not torch.equal(local_part(tensor), expected.to(local_part(tensor).dtype)):
            differ.append(key)
        if key in dict(eager.named_parameters()) and tensor.requires_grad != reference[key].requires_grad:
            flags.append(key)
    ema = [] if trainer.ema is None else [
        n for n, a, p in zip(trainer.ema.names, trainer.ema.averages, trainer.ema.params)
        if not torch.equal(local_part(a), local_part(p).float())]
    sharded = {k: t.shape[0] for k, t in model.named_parameters() if t.ndim and t.shape[0] > 1}
    return {"differ": differ, "requires_grad": flags, "ema": ema, "tensors": len(reference),
            "reads": [(k, stop - start, sharded.get(k)) for k, start, stop in reads]}


def worker(out: Path, data: Path) -> None:
    from clipx import dist
    from clipx.models import pretrained

    reads = []
    rows = pretrained.RowSource.rows

    def recorded(self, start, stop):
        reads.append((self.key, start, stop))
        return rows(self, start, stop)

    pretrained.RowSource.rows = recorded
    found = {name: check_case(name, out, data, reads) for name in CASES}
    found["world"] = dist.world_size()
    torch.save(found, out / f"rank{dist.rank()}.pt")


def write_inputs(out: Path) -> None:
    """The architecture file, and pretrained weights (another seed's eager model) in open_clip's names."""
    from safetensors.torch import save_file

    from clipx.config import load_config
    from clipx.methods import build_model

    for arch, name in ((TINY_VIT, ""), (TINY_RESNET, "-resnet")):
        (out / f"arch{name}.json").write_text(json.dumps(arch))
        torch.manual_seed(123)
        model = build_model(load_config(None, [f"model.name={out / f'arch{name}.json'}", "data.train=unused"]))
        save_file({k: v.contiguous() for k, v in model.clip_state_dict().items()}, str(out / f"pretrained{name}.safetensors"))


def test_sharded_initial_weights_equal_the_eager_build_and_pretrained_loads_shard_by_shard(digits_dir, tmp_path):
    from tests.distributed.launch import torchrun

    write_inputs(tmp_path)
    result = torchrun(["-m", "tests.test_fsdp_init", str(tmp_path), str(digits_dir)], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for found in ranks:
        for name in CASES:
            assert found[name]["tensors"] > 10
            assert found[name]["differ"] == [], name
            assert found[name]["requires_grad"] == [], name
            assert found[name]["ema"] == [], name
        reads = found["clip-pretrained"]["reads"]
        assert len(reads) > 10
        # A tensor sharded over 2 ranks (2 or more rows) is read half at most, never whole.
        assert all(count <= -(-rows // 2) for _, count, rows in reads if rows), reads
        assert found["clip-ema-lora-lock"]["reads"] == []


def test_a_clipmodel_file_read_row_by_row_equals_the_whole_conversion(tmp_path):
    """Row sources of a transformers CLIPModel layout (packed q/k/v, transposed projections) give the
    rows of the eager conversion."""
    from safetensors.torch import save_file

    from clipx.models.pretrained import _hf_layout, from_hf_clip, pretrained_rows

    config = {"model_type": "clip", "vision_config": {"num_hidden_layers": 1}, "text_config": {"num_hidden_layers": 1}}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(5, 3, generator=generator) for names, _ in _hf_layout(config).values() for k in names}
    state["logit_scale"] = torch.tensor(2.5)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    whole, lazy = from_hf_clip(state, config), pretrained_rows(tmp_path)
    assert set(whole) == set(lazy)
    for key, tensor in whole.items():
        assert lazy[key].shape == tensor.shape, key
        if tensor.ndim == 0:
            assert torch.equal(lazy[key].rows(0, 1), tensor)
            continue
        for start, stop in ((0, tensor.shape[0]), (1, 4), (4, tensor.shape[0]), (2, 2)):
            assert torch.equal(lazy[key].rows(start, stop), tensor[start:stop]), (key, start, stop)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
