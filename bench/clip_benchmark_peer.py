"""Run CLIP_benchmark's own command line (``clip_benchmark.cli``) on a model config file, for the evaluator benchmark.

    PYTHONPATH=runs/bench/openclip-site .venv/bin/python bench/clip_benchmark_peer.py \
        --model-config model.json -- eval --model model --pretrained model.safetensors --dataset wds/digits ...

clip-benchmark is installed without its dependencies into runs/bench/openclip-site by
bench/openclip_env.sh: everything it needs for zero-shot classification and retrieval is
already in .venv, except webdataset < 1.0, which that folder also holds. Its CLI imports the
captioning metrics at start-up (pycocoevalcap: 100 MB, mostly Java jars) although classification
and retrieval never call them, so this wrapper registers empty stand-in modules for them. Its
top-k accuracy converts a one-element array with float(), which NumPy 2 refuses; the wrapper swaps
in the same computation with a scalar read (``numpy_2_accuracy``). The model config is registered
with open_clip under its file stem.
"""

import argparse
import sys
import types

CAPTIONING_MODULES = ("pycocoevalcap", "pycocoevalcap.tokenizer", "pycocoevalcap.tokenizer.ptbtokenizer",
                      "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu", "pycocoevalcap.meteor",
                      "pycocoevalcap.meteor.meteor", "pycocoevalcap.rouge", "pycocoevalcap.rouge.rouge",
                      "pycocoevalcap.cider", "pycocoevalcap.cider.cider", "pycocoevalcap.spice",
                      "pycocoevalcap.spice.spice")
CAPTIONING_NAMES = ("PTBTokenizer", "Bleu", "Meteor", "Rouge", "Cider", "Spice")


def stand_in_captioning_modules() -> None:
    for name in CAPTIONING_MODULES:
        module = types.ModuleType(name)
        for attribute in CAPTIONING_NAMES:
            setattr(module, attribute, None)
        sys.modules[name] = module


def numpy_2_accuracy(output, target, topk=(1,)):
    """clip_benchmark.metrics.zeroshot_classification.accuracy, reading each count with .item()."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", required=True, help="an open_clip model config JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args, rest = parser.parse_known_args()
    import open_clip
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    open_clip.add_model_config(args.model_config)
    stand_in_captioning_modules()
    from clip_benchmark.cli import main as clip_benchmark_main
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = numpy_2_accuracy

    sys.argv = ["clip_benchmark", *[a for a in rest if a != "--"]]
    clip_benchmark_main()


if __name__ == "__main__":
    main()
