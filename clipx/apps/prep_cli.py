"""`clipx prep digits|photos|folder|csv|labelled|hf|embed-teacher|reinforce|sentences`: the shard writers' command line.

Arguments are parsed here and each handler calls its writer in data_prep/ (imported when the command
runs: pandas, scikit-learn and datasets are heavy); clipx/cli.py adds these subcommands to its parser
and turns a ClipxError into one line.
"""

from __future__ import annotations

from pathlib import Path

from clipx.errors import ClipxError
from clipx.templates import parse_classes


def add_prep(commands) -> None:
    """`clipx prep SOURCE ...`: the shard writers' subcommands, added to the CLI's ``commands``."""
    prep = commands.add_parser("prep", help="write webdataset shards + sizes.json")
    sources = prep.add_subparsers(dest="source", required=True)

    digits = sources.add_parser("digits", help="scikit-learn's handwritten digits, split into train/ and test/")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--shard-size", type=int, default=256)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--test-fraction", type=float, default=0.2)
    digits.add_argument("--templates", default=None, help="YAML with classnames and templates (default: digits)")
    digits.add_argument("--classes", default=None, help="only these labels, e.g. 0-4 (a fine-tuning task)")
    digits.set_defaults(func=_prep_digits)

    photos = _add_photos(sources)

    for name, help_text in (("folder", "a folder of images + a captions file"),
                            ("csv", "a captions table whose image column holds paths")):
        table = sources.add_parser(name, help=help_text)
        table.add_argument("--captions", required=True, help="CSV, TSV, JSONL or Parquet file")
        table.add_argument("--images", default=None, help="folder the image paths are relative to "
                                                          "(default: the captions file's folder)")
        table.add_argument("--image-column", default="image")
        table.add_argument("--caption-column", default="caption")
        table.add_argument("--group-by-image", action="store_true",
                           help="rows naming the same image become one sample with one caption per line "
                                "(Flickr30k/COCO retrieval tables)")
        table.set_defaults(func=_prep_folder)

    labelled = sources.add_parser("labelled", help="a folder of class subfolders of images (ImageFolder layout); "
                                  "also writes classes.yaml for eval.templates")
    labelled.add_argument("--images", required=True, help="the folder: one subfolder of images per class")
    labelled.add_argument("--templates", nargs="+", default=None,
                          help="prompt templates with {} for the class name (default: 'a photo of a {}.'); the "
                          "first one makes each sample's caption")
    labelled.set_defaults(func=_prep_labelled)

    hf = sources.add_parser("hf", help="a Hugging Face `datasets` dataset on local disk")
    hf.add_argument("--dataset", required=True, help="folder saved with save_to_disk, or data files for --builder")
    hf.add_argument("--builder", default=None, help="build from local files: csv, json, parquet, imagefolder")
    hf.add_argument("--split", default="train")
    hf.add_argument("--image-column", default="image")
    hf.add_argument("--caption-column", default="text")
    hf.set_defaults(func=_prep_hf)

    for sub in sources.choices.values():
        sub.add_argument("--out", required=True, help="output folder for shards and sizes.json")
        sub.add_argument("--workers", type=int, default=2, help="image re-encoding processes")
        if sub not in (digits, photos):
            sub.add_argument("--image-size", type=int, default=224)
            sub.add_argument("--shard-size", type=int, default=10000)
    _add_embed_teacher(sources)
    _add_reinforce(sources)
    _add_sentences(sources)


def _add_sentences(sources) -> None:
    sentences = sources.add_parser("sentences", help="text-only training shards (SimCSE) and STS/retrieval "
                                                      "evaluation files from class names x prompt templates")
    sentences.add_argument("--out", required=True, help="output folder: train/ shards, sts.tsv, retrieval.tsv, "
                                                        "manifest.json")
    sentences.add_argument("--templates", default="imagenet", help="shipped set (imagenet, digits) or a YAML path")
    sentences.add_argument("--seed", type=int, default=0)
    sentences.add_argument("--heldout-templates", type=int, default=None,
                           help="templates kept out of training for evaluation (default: a quarter, 20 of 80)")
    sentences.add_argument("--heldout-classes", type=int, default=None,
                           help="class names kept out of training for evaluation (default: a fifth, 200 of 1000)")
    sentences.add_argument("--samples", type=int, default=None,
                           help="training samples drawn with the seed (default: every train class x train template)")
    sentences.add_argument("--pairs", action="store_true",
                           help="add a paraphrase (.pos.txt: same class, another template) for supervised SimCSE")
    sentences.add_argument("--shard-size", type=int, default=1000)
    sentences.add_argument("--sts-pairs", type=int, default=2000, help="sentence pairs in sts.tsv")
    sentences.set_defaults(func=_prep_sentences)


def _prep_sentences(args) -> int:
    from data_prep.sentences import prep_sentences

    summary, manifest = prep_sentences(Path(args.out), args.templates, seed=args.seed,
                                       heldout_templates=args.heldout_templates,
                                       heldout_classes=args.heldout_classes, samples=args.samples,
                                       pairs=args.pairs, shard_size=args.shard_size, sts_pairs=args.sts_pairs)
    counts, out = manifest["counts"], Path(args.out)
    print(summary.format())
    print(f"evaluation (held-out templates x held-out classes): {counts['sts_pairs']} pairs in {out / 'sts.tsv'}, "
          f"{counts['retrieval_queries']} queries in {out / 'retrieval.tsv'}; split in {out / 'manifest.json'}")
    return 0


def _add_embed_teacher(sources) -> None:
    embed = sources.add_parser("embed-teacher", help="copy shards adding each sample's teacher embeddings "
                                                      "(teacher.npy), for distill.embedded")
    embed.add_argument("--teacher", required=True, help="a clipx run or checkpoint, an open_clip folder or a "
                                                        "transformers CLIPModel folder")
    embed.add_argument("--shards", required=True, help="shard pattern or folder to embed")
    embed.add_argument("--out", required=True, help="output folder: the shards again, sizes.json, teacher.json")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--device", default="cpu")
    embed.set_defaults(func=_prep_embed_teacher)


def _prep_embed_teacher(args) -> int:
    from data_prep.embed_teacher import embed_teacher, summary_line

    if args.batch_size <= 0:
        raise ClipxError(f"--batch-size must be positive; got {args.batch_size}")
    print(summary_line(embed_teacher(args.teacher, args.shards, args.out, args.batch_size, args.device)))
    return 0


def _prep_digits(args) -> int:
    from data_prep import prep_digits

    summaries = prep_digits(Path(args.out), image_size=args.image_size, shard_size=args.shard_size,
                            test_fraction=args.test_fraction, seed=args.seed, workers=args.workers,
                            templates_file=args.templates,
                            classes=parse_classes(args.classes) if args.classes else None)
    for split, summary in summaries.items():
        print(f"{split}: {summary.format()}")
    return 0


def _add_photos(sources):
    photos = sources.add_parser("photos", help="crops of the photographs shipped in scikit-image and scikit-learn, "
                                "one class per photo; train/ and test/ from disjoint parts (needs scikit-image)")
    photos.add_argument("--image-size", type=int, default=32)
    photos.add_argument("--shard-size", type=int, default=256)
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--train-per-class", type=int, default=87, help="train crops per photo")
    photos.add_argument("--test-per-class", type=int, default=22, help="test crops per photo")
    photos.add_argument("--templates", default=None, help="YAML with classnames and templates (default: photos)")
    photos.set_defaults(func=_prep_photos)
    return photos


def _prep_photos(args) -> int:
    from data_prep.photos import prep_photos

    summaries = prep_photos(Path(args.out), image_size=args.image_size, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class, seed=args.seed, workers=args.workers,
                            templates_file=args.templates, shard_size=args.shard_size)
    for split, summary in summaries.items():
        print(f"{split}: {summary.format()}")
    return 0


def _prep_folder(args) -> int:
    from data_prep import prep_folder

    images = args.images or str(Path(args.captions).parent)
    summary = prep_folder(images, args.captions, Path(args.out), image_column=args.image_column,
                          caption_column=args.caption_column, image_size=args.image_size,
                          shard_size=args.shard_size, workers=args.workers, group_by_image=args.group_by_image)
    print(summary.format())
    return 0


def _prep_labelled(args) -> int:
    from data_prep import prep_labelled_folder
    from data_prep.labelled import CLASSES_FILE

    summary = prep_labelled_folder(args.images, Path(args.out), templates=args.templates, image_size=args.image_size,
                                   shard_size=args.shard_size, workers=args.workers)
    print(summary.format())
    print(f"class names and prompt templates: {Path(args.out) / CLASSES_FILE} (give it as eval.templates)")
    return 0


def _prep_hf(args) -> int:
    from data_prep import prep_hf

    summary = prep_hf(args.dataset, Path(args.out), image_column=args.image_column,
                      caption_column=args.caption_column, split=args.split, builder=args.builder,
                      image_size=args.image_size, shard_size=args.shard_size, workers=args.workers)
    print(summary.format())
    return 0


def _add_reinforce(sources) -> None:
    sub = sources.add_parser("reinforce", help="copy shards adding stored augmentations, synthetic captions and an "
                                               "ensemble of teachers' embeddings of both (data.reinforced)")
    sub.add_argument("--teachers", required=True, help="comma-separated: clipx runs or checkpoints, open_clip or "
                                                       "transformers CLIP folders")
    sub.add_argument("--shards", required=True, help="shard pattern or folder, local or remote (s3://, https://)")
    sub.add_argument("--endpoint-url", default=None, help="S3-compatible store of remote shards")
    sub.add_argument("--out", required=True, help="output folder: the shards again, sizes.json, reinforce.json")
    sub.add_argument("--augmentations", type=int, default=4, help="stored views per image (K)")
    sub.add_argument("--captions", type=int, default=2, help="synthetic captions per image (N)")
    sub.add_argument("--captioner", default=None, help="a clipx coca/siglip2 run or an open_clip CoCa folder; "
                                                        "without it the .json's --caption-key field is used")
    sub.add_argument("--caption-key", default="synthetic_captions", help="the .json field of the synthetic captions")
    sub.add_argument("--caption-method", default="sample", choices=("greedy", "beam", "sample"))
    sub.add_argument("--temperature", type=float, default=1.0)
    sub.add_argument("--top-k", type=int, default=0)
    sub.add_argument("--max-tokens", type=int, default=30)
    sub.add_argument("--image-size", type=int, default=224, help="the student's image size (px): views are stored at it")
    sub.add_argument("--crop-scale-min", type=float, default=0.35)
    sub.add_argument("--flip-prob", type=float, default=0.5)
    sub.add_argument("--jitter-prob", type=float, default=0.8)
    sub.add_argument("--jitter-strength", type=float, default=1.0)
    sub.add_argument("--hue", type=float, default=0.0, help="the largest hue shift, in turns (0: none)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--processes", type=int, default=1)
    sub.add_argument("--device", default=None)
    sub.set_defaults(func=_prep_reinforce)


def _prep_reinforce(args) -> int:
    from clipx.data.reinforce import ViewRecipe
    from clipx.data.remote import RemoteOptions
    from data_prep.reinforce import Decoding, reinforce_shards, summary_line

    result = reinforce_shards(
        [path.strip() for path in args.teachers.split(",")], args.shards, args.out,
        augmentations=args.augmentations, captions=args.captions, captioner=args.captioner,
        caption_key=args.caption_key, image_size=args.image_size,
        recipe=ViewRecipe(args.crop_scale_min, args.flip_prob, args.jitter_prob, args.jitter_strength, args.hue),
        decoding=Decoding(args.caption_method, temperature=args.temperature, top_k=args.top_k,
                          max_tokens=args.max_tokens),
        seed=args.seed, batch_size=args.batch_size, processes=args.processes, device=args.device,
        options=RemoteOptions(endpoint_url=args.endpoint_url))
    print(summary_line(result))
    return 0
