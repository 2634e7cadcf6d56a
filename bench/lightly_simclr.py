"""clipx SimCLR against lightly's SimCLR: same encoder, data, batch, steps and augmentations, several seeds.

    bash bench/lightly_env.sh            # lightly into runs/bench/lightly-site, outside clipx's venv
    PYTHONPATH=runs/bench/lightly-site .venv/bin/python bench/lightly_simclr.py --steps 300

Both sides train the tiny ViT of configs/simclr-digits.yaml (open_clip vision tower, 32 px) with a
BatchNorm MLP head, AdamW and the same warmup-cosine schedule, on the digits training shards, then
are scored by the same kNN probe, for each of several seeds (one seed's kNN top-1 on 360 test
images moves by about a point from seed to seed, more than the gap being measured). clipx runs its
own pipeline (webdataset shards, its loop); lightly runs its documented recipe: SimCLRTransform,
SimCLRProjectionHead and NTXentLoss in a plain PyTorch loop over a map-style dataset of the same
decoded images. Prints a Markdown table (per seed, mean kNN, median samples/s) and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
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
    parser.add_argument("--seeds", default="0,1,2,3,4",
                        help="comma-separated train.seed values; each seed runs clipx then lightly")
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
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {"clipx": [], "lightly": []}
    for seed in seeds:
        config = load_config(SIMCLR_CONFIG, [
            f"data.train={data / 'train'}", "data.val=null", f"train.steps={args.steps}", f"train.seed={seed}",
            f"train.output_dir={args.out / f'clipx-run-{seed}'}", f"train.threads={args.threads}",
            f"train.checkpoint_every={args.steps}"])
        for name, run in (("clipx", lambda: train_clipx(config)),
                          ("lightly", lambda: train_lightly(config, data / "train", args.steps))):
            model, rate = run()
            knn = probe(model, config.model, data, "cpu")["knn"]["top1"]
            runs[name].append({"seed": seed, "samples_per_second": rate, "knn_top1": knn})
            print(f"seed {seed} {name}: kNN top-1 {knn:.4f}, {rate:.0f} samples/s", flush=True)
    results = {name: summarise(per_seed) for name, per_seed in runs.items()}
    results["setup"] = {"steps": args.steps, "batch_size": config.train.batch_size, "threads": args.threads,
                        "seeds": seeds, "lightly_version": lightly.__version__, "torch_version": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


def summarise(per_seed: list[dict]) -> dict:
    """Per-seed runs -> their mean and spread of kNN top-1 and median samples/s."""
    knn = [run["knn_top1"] for run in per_seed]
    return {"runs": per_seed, "knn_top1_mean": statistics.mean(knn),
            "knn_top1_stdev": statistics.stdev(knn) if len(knn) > 1 else 0.0,
            "samples_per_second_median": statistics.median(run["samples_per_second"] for run in per_seed)}


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = ["| seed | clipx kNN top-1 | lightly kNN top-1 | clipx samples/s | lightly samples/s |",
             "|---:|---:|---:|---:|---:|"]
    for mine, theirs in zip(results["clipx"]["runs"], results["lightly"]["runs"]):
        lines.append(f"| {mine['seed']} | {mine['knn_top1']:.3f} | {theirs['knn_top1']:.3f} | "
                     f"{mine['samples_per_second']:.0f} | {theirs['samples_per_second']:.0f} |")
    clipx, lightly = results["clipx"], results["lightly"]
    lines.append(f"| **mean kNN, median samples/s** | **{clipx['knn_top1_mean']:.3f}** | "
                 f"**{lightly['knn_top1_mean']:.3f}** | **{clipx['samples_per_second_median']:.0f}** | "
                 f"**{lightly['samples_per_second_median']:.0f}** |")
    ratio = clipx["samples_per_second_median"] / lightly["samples_per_second_median"]
    gap = clipx["knn_top1_mean"] - lightly["knn_top1_mean"]
    lines += ["", f"kNN top-1 standard deviation over seeds: clipx {clipx['knn_top1_stdev']:.3f}, lightly "
                  f"{lightly['knn_top1_stdev']:.3f}. Samples/s ratio (medians): {ratio:.2f}. Mean kNN gap "
                  f"(clipx - lightly): {gap:+.3f}.",
              f"{setup['steps']} steps of batch {setup['batch_size']}, {setup['threads']} threads, seeds "
              f"{setup['seeds']}, lightly {setup['lightly_version']}, torch {setup['torch_version']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
