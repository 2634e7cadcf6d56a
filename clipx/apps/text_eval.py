"""`clipx eval sts|text-retrieval`: a checkpoint's text tower on sentence pairs from TSV files.

Any checkpoint whose model embeds text serves: a text-only (SimCSE) run, or a CLIP's text tower.
The metrics are eval/text_similarity.py's; this module turns a model into its ``encode`` callable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic


def add_text_eval(tasks) -> list:
    """Add the sts and text-retrieval subcommands to ``clipx eval``'s ``tasks``; returns their parsers
    (the CLI adds its common --precision and --weights options to them)."""
    parsers = []
    for task, data_help in (("sts", "TSV of sentence1, sentence2, gold score (STS-benchmark style)"),
                            ("text-retrieval", "TSV of query, positive text pairs")):
        sub = tasks.add_parser(task, help="a text tower's sentence embeddings: " + data_help.split(" (")[0])
        sub.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory: its latest)")
        sub.add_argument("--data", required=True, help=data_help)
        sub.add_argument("--out", required=True, help="JSON file to write")
        sub.add_argument("--batch-size", type=int, default=256)
        sub.set_defaults(func=run_text_eval)
        parsers.append(sub)
    return parsers


def sentence_encoder(model, tokenizer, device, precision: str = "fp32") -> Callable[[list[str]], torch.Tensor]:
    """sentences -> (N, D) fp32 unit-norm embeddings on the CPU, through ``model.encode_text``."""
    from clipx.models.inference import InferenceEncoder

    encoder = InferenceEncoder(model, device, precision)
    return lambda sentences: encoder.encode_text(tokenizer(list(sentences)).to(device)).cpu()


def run_text_eval(args) -> int:
    from clipx.api import choose_weights, load_model
    from clipx.data.tokenizer import Tokenizer
    from eval.run import default_device
    from eval.text_similarity import read_pairs_tsv, read_sts_tsv, sts_metrics, text_retrieval_metrics

    rows = read_sts_tsv(args.data) if args.task == "sts" else read_pairs_tsv(args.data)  # bad input fails first
    device = default_device()
    weights = choose_weights(args.checkpoint, args.weights)
    model, config = load_model(args.checkpoint, device, weights)
    if not hasattr(model, "encode_text"):
        raise ClipxError(f"{args.checkpoint} has no text tower (loss.name={config.loss.name}); sentence evaluation "
                         "needs a text-only or image-text checkpoint")
    encode = sentence_encoder(model, Tokenizer(config.model), device, args.precision)
    if args.task == "sts":
        results = {"sts": sts_metrics(encode, rows, args.batch_size)}
    else:
        results = {"text_retrieval": text_retrieval_metrics(encode, rows, batch_size=args.batch_size)}
    results.update(checkpoint=str(args.checkpoint), data=str(args.data), precision=args.precision, weights=weights)
    write_json_atomic(Path(args.out), results)
    print(json.dumps(results, indent=2))
    return 0
