"""`clipx curate score|filter|dedup|balance|decontaminate|apply`: the command line of data curation."""

from __future__ import annotations

import argparse
import json


def add_curate(commands) -> None:
    curate = commands.add_parser("curate", help="score, filter, deduplicate, balance and decontaminate shards")
    stages = curate.add_subparsers(dest="stage", required=True)
    _add_score(stages)
    _add_filter_and_dedup(stages)
    _add_balance_decontaminate_apply(stages)


def _add_score(stages) -> None:
    score = stages.add_parser("score", help="a CLIP's image-text score of every sample, as parquet beside CUR")
    score.add_argument("--shards", required=True, help="shard pattern or folder, local or remote (s3://, https://)")
    score.add_argument("--model", required=True,
                       help="the scorer: a clipx run or checkpoint, an open_clip folder or a transformers CLIPModel folder")
    score.add_argument("--out", required=True, help="the curation folder (a rerun resumes it)")
    score.add_argument("--embeddings", action="store_true",
                       help="also keep the image and text embeddings (float16): dedup, decontaminate and --target need them")
    score.add_argument("--copy-descriptor", default=None,
                       help="what dedup and decontaminate compare instead of the scorer's image embeddings: 'thumbnail' "
                            "(a continuous perceptual hash, no model) or an image encoder trained for instance "
                            "discrimination (a clipx SimCLR or MoCo run)")
    score.add_argument("--batch-size", type=int, default=256)
    score.add_argument("--processes", type=int, default=1,
                       help="scoring processes on this machine (under srun/torchrun each rank scores its share)")
    score.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    score.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    score.add_argument("--endpoint-url", default=None, help="S3-compatible store of remote shards")
    score.set_defaults(func=_score)


def _add_filter_and_dedup(stages) -> None:
    keep = stages.add_parser("filter", help="keep by CLIP score (threshold, auto, top fraction) and/or image clusters")
    keep.add_argument("cur")
    keep.add_argument("--threshold", default=None, help="minimum score, or 'auto' (Otsu's split of the scores)")
    keep.add_argument("--top-fraction", type=float, default=None, help="keep this fraction of best scores (DataComp: 0.3)")
    keep.add_argument("--target", default=None,
                      help="curation folder of the target task's images: keep only samples in the clusters they fall in")
    keep.add_argument("--clusters", type=int, default=100, help="k-means clusters of the image-based filter")
    keep.add_argument("--nearest", type=int, default=1, help="clusters each target image votes for")
    keep.add_argument("--seed", type=int, default=0)
    keep.set_defaults(func=_filter)

    dedup = stages.add_parser("dedup", help="drop exact (same bytes) and near (SemDeDup) duplicate images")
    dedup.add_argument("cur")
    dedup.add_argument("--no-exact", dest="exact", action="store_false", help="skip the byte-hash pass")
    dedup.add_argument("--threshold", type=float, default=0.95,
                       help="cosine above which two images are near-duplicates; 0 turns the semantic pass off")
    dedup.add_argument("--clusters", type=int, default=None, help="k-means clusters (default: one per 1,000 samples)")
    dedup.add_argument("--seed", type=int, default=0)
    dedup.set_defaults(func=_dedup)


def _add_balance_decontaminate_apply(stages) -> None:
    balance = stages.add_parser("balance", help="MetaCLIP: cap each concept entry's samples at t")
    balance.add_argument("cur")
    balance.add_argument("--t", type=int, required=True, help="samples per entry above which it is sampled down")
    balance.add_argument("--concepts", default="digits,imagenet",
                         help="a text file of entries (one per line), or shipped template sets whose class names are the entries")
    balance.add_argument("--unmatched", choices=("drop", "keep"), default="drop",
                         help="captions matching no entry (MetaCLIP drops them)")
    balance.add_argument("--seed", type=int, default=0)
    balance.set_defaults(func=_balance)

    clean = stages.add_parser("decontaminate", help="drop samples whose image nearly duplicates an evaluation image")
    clean.add_argument("cur")
    clean.add_argument("--against", required=True,
                       help="curation folder of the evaluation shards (curate score --embeddings, same --model)")
    clean.add_argument("--threshold", type=float, default=0.95)
    clean.set_defaults(func=_decontaminate)

    done = stages.add_parser("apply", help="write CUR/keep.parquet (data.keep) and optionally curated shards")
    done.add_argument("cur")
    done.add_argument("--rewrite", default=None, help="also copy the kept samples into shards in this folder")
    done.set_defaults(func=_apply)


def _print(report: dict) -> int:
    print(json.dumps({k: v for k, v in report.items() if k not in ("histogram", "examples", "pairs")}, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    from clipx.apps.curate import score_shards
    from clipx.data.remote import RemoteOptions

    return _print(score_shards(args.shards, args.model, args.out, args.embeddings, args.batch_size, args.processes,
                               args.device, args.precision, RemoteOptions(endpoint_url=args.endpoint_url),
                               args.copy_descriptor))


def _filter(args: argparse.Namespace) -> int:
    from clipx.apps.curate_stages import run_filter

    threshold = args.threshold if args.threshold in (None, "auto") else _number(args.threshold, "--threshold")
    return _print(run_filter(args.cur, threshold, args.top_fraction, args.target, args.clusters, args.nearest,
                             args.seed))


def _number(text: str, flag: str) -> float:
    from clipx.errors import ClipxError

    try:
        return float(text)
    except ValueError:
        raise ClipxError(f"{flag} must be a number or 'auto', got {text!r}") from None


def _dedup(args: argparse.Namespace) -> int:
    from clipx.apps.curate_stages import run_dedup

    return _print(run_dedup(args.cur, args.exact, args.threshold or None, args.clusters, args.seed))


def _balance(args: argparse.Namespace) -> int:
    from clipx.apps.curate_stages import run_balance

    return _print(run_balance(args.cur, args.t, args.concepts, args.seed, args.unmatched))


def _decontaminate(args: argparse.Namespace) -> int:
    from clipx.apps.curate_stages import run_decontaminate

    return _print(run_decontaminate(args.cur, args.against, args.threshold))


def _apply(args: argparse.Namespace) -> int:
    from clipx.apps.curate_stages import apply

    return _print(apply(args.cur, args.rewrite))
