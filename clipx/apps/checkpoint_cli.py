"""`clipx export|consolidate|encode`: the commands that read a checkpoint and write it, or its
embeddings, in another form; and the --weights and --precision options that every command reading
a checkpoint shares. clipx/cli.py adds these to its parser and turns a ClipxError into one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipx.run_layout import WEIGHT_CHOICES  # a light module: the parser is built before torch is imported


def add_checkpoint_commands(commands) -> None:
    """`clipx export`, `clipx consolidate` and `clipx encode`, added to the CLI's ``commands``."""
    _add_export(commands)
    _add_consolidate(commands)
    _add_encode(commands)


def add_weights(parser) -> None:
    """--weights: a checkpoint's raw or EMA weights."""
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="the trained weights (raw) or their moving average (ema, train.ema_decay); "
                        "auto: ema when the checkpoint has it")


def add_precision(parser) -> None:
    """--precision: the towers' arithmetic when encoding."""
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the towers' arithmetic (bf16: autocast; features and metrics stay fp32)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint in another tool's format")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory: its latest)")
    export.add_argument("--format", required=True, choices=["open_clip", "hf", "lora", "sentence-transformers"],
                        help="open_clip: a local-dir:DIR folder (open_clip_config.json + safetensors); "
                        "hf: a transformers CLIPModel folder with its tokenizer and image processor "
                        "(both with LoRA adapters merged in); lora: a LoRA run's adapters alone, in PEFT's layout; "
                        "sentence-transformers: a transformers text tower with its pooling and projection")
    export.add_argument("--out", required=True, help="directory to write")
    add_weights(export)
    export.set_defaults(func=_export)


def _export(args) -> int:
    from clipx.api import choose_weights

    weights = choose_weights(args.checkpoint, args.weights)
    if args.format == "lora":
        from clipx.apps.export_lora import export_lora

        out = export_lora(args.checkpoint, args.out, weights)
        print(f"wrote {out} ({weights} weights): LoRA adapters in PEFT's layout (peft.PeftModel.from_pretrained)")
        return 0
    if args.format == "sentence-transformers":
        from clipx.apps.export_sentence import export_sentence_transformers

        out = export_sentence_transformers(args.checkpoint, args.out, weights)
        print(f"wrote {out} ({weights} weights): transformers.AutoModel.from_pretrained('{out}') plus its pooling "
              f"and projection, or sentence_transformers.SentenceTransformer('{out}')")
        return 0
    if args.format == "hf":
        from clipx.apps.export_hf import export_hf

        out = export_hf(args.checkpoint, args.out, weights)
        print(f"wrote {out} ({weights} weights): load it with transformers.CLIPModel.from_pretrained('{out}')")
        return 0
    from clipx.apps.export import export_open_clip

    out = export_open_clip(args.checkpoint, args.out, weights)
    print(f"wrote {out} ({weights} weights): load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _add_consolidate(commands) -> None:
    consolidate = commands.add_parser("consolidate", help="join a sharded (FSDP) checkpoint's model into one file")
    consolidate.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest)")
    consolidate.add_argument("--out", default=None, help="file to write (default CHECKPOINT/model.safetensors; "
                             "an EMA model goes beside it, as model_ema.safetensors or OUT's stem + _ema)")
    consolidate.set_defaults(func=_consolidate)


def _consolidate(args) -> int:
    from clipx.api import consolidate
    from clipx.run_layout import as_checkpoint, model_shards

    print(f"wrote {consolidate(args.checkpoint, args.out)}")
    if model_shards(as_checkpoint(args.checkpoint), "ema"):  # train.ema_decay: the EMA model too, beside it
        ema_out = None if args.out is None else Path(args.out).with_name(Path(args.out).stem + "_ema.safetensors")
        print(f"wrote {consolidate(args.checkpoint, ema_out, 'ema')}")
    return 0


def _add_encode(commands) -> None:
    encode = commands.add_parser("encode", help="embed images and/or texts into .npy or .parquet")
    encode.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory: its latest)")
    encode.add_argument("--images", help="a glob of image files (quote it), or shards: a .tar pattern or folder")
    encode.add_argument("--texts", help="a text file, one text per line")
    encode.add_argument("--out", required=True, help="FILE.npy (plus FILE.npy.ids.json) or FILE.parquet")
    encode.add_argument("--batch-size", type=int, default=256)
    encode.add_argument("--workers", type=int, default=2)
    add_precision(encode)
    add_weights(encode)
    encode.set_defaults(func=_encode)


def _encode(args) -> int:
    from clipx.apps.encode import encode

    summary = encode(args.checkpoint, args.out, images=args.images, texts=args.texts, batch_size=args.batch_size,
                     workers=args.workers, precision=args.precision, weights=args.weights)
    print(json.dumps(summary, indent=2))
    return 0
