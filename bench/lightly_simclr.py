"""clipx SimCLR against lightly's SimCLR: same encoder, data, batch, steps and augmentations, one run.

    bash bench/lightly_env.sh            # lightly into runs/bench/lightly-site, outside clipx's venv
    PYTHONPATH=runs/bench/lightly-site .venv/bin/python bench/lightly_simclr.py --steps 300

Both sides train the tiny ViT of configs/simclr-digits.yaml (open_clip vision tower, 32 px) with a
BatchNorm MLP head, AdamW and the same warmup-cosine schedule, on the digits training shards, then
are scored by the same kNN probe. clipx runs its own pipeline (webdataset shards, its loop); lightly
runs its documented recipe: SimCLRTransform, SimCLRProjectionHead and NTXentLoss in a plain PyTorch
loop over a map-style dataset of the same decoded images. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

SIMCLR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simclr-digits.yaml"


class DigitImages(torch.utils.data.Dataset):
    """Every image of the training shards, decoded once, through a lightly transform."""

    def __init__(self, shards_dir: Path, transform):
        self.images = []
        for shard in sorted(shards_dir.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith((".png", ".jpg")):
                        image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                        self.images.append(image.convert("RGB"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index])


class LightlySimCLR(torch.nn.Module):
    """clipx's backbone with lightly's projection head; ``encode_image`` for the shared kNN probe."""

    def __init__(self, backbone, feature_dim: int, hidden: int, out: int):
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone, self.feature_dim = backbone, feature_dim
        self.head = SimCLRProjectionHead(feature_dim, hidden, out)

    def encode_image(self, images):
        return torch.nn.functional.normalize(self.backbone(images), dim=-1)

    def forward(self, images):
        return self.head(self.backbone(images))


def train_lightly(config, data: Path, steps: int) -> tuple[torch.nn.Module, float]:
    """lightly's SimCLR for ``steps`` steps; returns (model, samples/s after the first step)."""
    from lightly.loss import NTXentLoss
    from lightly.transforms import SimCLRTransform

    from clipx.methods import build_model
    from clipx.train.optim import build_optimizer
    from clipx.train.schedule import cosine_with_warmup

    s, v, t, m = config.ssl, config.ssl.views, config.train, config.model
    transform = SimCLRTransform(
        input_size=m.arch["vision_cfg"]["image_size"], cj_prob=v.jitter_prob, cj_strength=v.jitter_strength,
        min_scale=config.data.crop_scale_min, random_gray_scale=v.grayscale_prob, gaussian_blur=v.blur_prob,
        hf_prob=v.flip_prob, normalize={"mean": list(m.image_mean), "std": list(m.image_std)})
    loader = torch.utils.data.DataLoader(
        DigitImages(data, transform), batch_size=t.batch_size, shuffle=True, drop_last=True,
        num_workers=config.data.workers, persistent_workers=config.data.workers > 0,
        generator=torch.Generator().manual_seed(t.seed))
    torch.manual_seed(t.seed)
    encoder = build_model(config)  # the same backbone class and initialisation as clipx's run
    model = LightlySimCLR(encoder.backbone, encoder.feature_dim, s.head_hidden, s.head_out)
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(cosine_with_warmup, total_steps=steps, warmup_steps=t.warmup_steps))
    criterion = NTXentLoss(temperature=s.temperature)
    step, started = 0, None
    while step < steps:
        for first, second in loader:  # SimCLRTransform: two views per image, no label
            projections = model(torch.cat([first, second]))
            loss = criterion(projections[: len(first)], projections[len(first):])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == 1:
                started = time.perf_counter()  # like clipx's figure: worker start-up excluded
            if step == steps:
                break
    rate = (steps - 1) * t.batch_size / (time.perf_counter() - started)
    return model.eval(), rate


def train_clipx(config) -> tuple[torch.nn.Module, float]:
    from clipx.api import load_model
    from clipx.train.loop import train

    summary = train(config)
    model, _ = load_model(summary["checkpoint"])
    return model, summary["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lightly_simclr"))
    args = parser.parse_args()

    import lightly

    from clipx.apps.demo_ssl import probe
    from clipx.config import load_config
    from data_prep import prep_digits

    torch.set_num_threads(args.threads)
    data = args.out / "data"
    if not (data / "train" / "sizes.json").is_file():
        prep_digits(data, image_size=32, workers=2)
    config = load_config(SIMCLR_CONFIG, [f"data.train={data / 'train'}", "data.val=null", f"train.steps={args.steps}",
                                         f"train.output_dir={args.out / 'clipx-run'}", f"train.threads={args.threads}",
                                         f"train.checkpoint_every={args.steps}"])
    results = {}
    for name, run in (("clipx", lambda: train_clipx(config)), ("lightly", lambda: train_lightly(config, data / "train",
                                                                                              args.steps))):
        model, rate = run()
        results[name] = {"samples_per_second": rate, "knn_top1": probe(model, config.model, data, "cpu")["knn"]["top1"]}
    results["setup"] = {"steps": args.steps, "batch_size": config.train.batch_size, "threads": args.threads,
                        "lightly_version": lightly.__version__, "torch_version": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("| trainer | kNN top-1 | train samples/s |\n|---|---:|---:|")
    for name in ("clipx", "lightly"):
        print(f"| {name} | {results[name]['knn_top1']:.3f} | {results[name]['samples_per_second']:.0f} |")
    print(f"\n{args.steps} steps of batch {config.train.batch_size}, {args.threads} threads, lightly "
          f"{lightly.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
