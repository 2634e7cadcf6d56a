"""`clipx caption`: the command line of captioning shards with a trained captioner."""

from __future__ import annotations

import argparse

from clipx.apps.checkpoint_cli import add_weights


def add_caption(commands) -> None:
    caption = commands.add_parser("caption", help="write a captioner's caption of every sample into copies of "
                                  "its shards (a .json field beside the original .txt)")
    caption.add_argument("--checkpoint", required=True, help="a clipx coca or siglip2 run or checkpoint, or an "
                         "open_clip CoCa folder (clipx export)")
    caption.add_argument("--data", required=True, help="shard pattern or folder, local or remote (s3://, https://)")
    caption.add_argument("--out", required=True, help="folder of the captioned copies (a rerun resumes it)")
    caption.add_argument("--key", default="synthetic_caption",
                         help="the .json field of the caption; train on it with data.caption_keys: {txt: 0.5, KEY: 0.5}")
    caption.add_argument("--method", choices=("greedy", "beam", "sample"), default="greedy")
    caption.add_argument("--beams", type=int, default=4, help="hypotheses per image (--method beam)")
    caption.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (--method sample)")
    caption.add_argument("--top-k", type=int, default=0, help="draw among the k likeliest tokens; 0: all "
                         "(--method sample)")
    caption.add_argument("--seed", type=int, default=0, help="seed of --method sample's draws (per shard and batch)")
    caption.add_argument("--max-tokens", type=int, default=30, help="generated tokens per caption, the end included")
    caption.add_argument("--min-tokens", type=int, default=0, help="tokens generated before the caption may end")
    caption.add_argument("--batch-size", type=int, default=64)
    caption.add_argument("--processes", type=int, default=1,
                         help="captioning processes on this machine (under srun/torchrun each rank captions its share)")
    caption.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    add_weights(caption)
    caption.add_argument("--endpoint-url", default=None, help="S3-compatible store of remote shards")
    caption.set_defaults(func=_caption)


def _caption(args: argparse.Namespace) -> int:
    from clipx.apps.caption import caption_shards
    from clipx.data.remote import RemoteOptions

    done = caption_shards(args.checkpoint, args.data, args.out, key=args.key, method=args.method, beams=args.beams,
                          temperature=args.temperature, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens,
                          min_tokens=args.min_tokens, batch_size=args.batch_size, processes=args.processes,
                          device=args.device, weights=args.weights,
                          options=RemoteOptions(endpoint_url=args.endpoint_url))
    odd = f", {done['json_not_object']} whose .json is not an object" if done["json_not_object"] else ""
    print(f"{args.out}: {done['written']} shards written, {done['skipped']} skipped as done; "
          f"{done['captioned']} samples captioned, {done['without_image']} without an image{odd}")
    return 0
