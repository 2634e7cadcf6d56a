"""The run configuration's sections: one frozen dataclass each, a ``Literal`` for every choice.

The comments are the documentation: ``clipx config --reference`` (clipx/apps/config_reference.py)
writes docs/CONFIG.md from this file. A class's docstring introduces its section; the comment lines
directly above a field, and the comment after it on its line, explain that key (every key has one);
``[run time]`` marks a key whose default is decided when the run starts. A list of allowed values is
a ``Literal`` here, and any other module that needs the list derives it with ``typing.get_args``.
Like clipx.config, this module imports nothing of clipx.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

# The choices other modules check too, each with its tuple of values (the fields below explain them).
# loss.gather; a loss may honour a subset (SigLIP's ring: clipx/losses/siglip.py).
GatherMode = Literal["none", "global", "local"]
GATHER_MODES: tuple[str, ...] = typing.get_args(GatherMode)
# model.lora_targets: the layers of a tower's blocks that LoRA adapts (clipx/models/lora.py).
LoraTarget = Literal["attn", "mlp"]
LORA_TARGETS: tuple[LoraTarget, ...] = typing.get_args(LoraTarget)
# train.attention: "auto" measures; "default" leaves the choice to PyTorch; then SDPA's kernels and
# clipx's explicit one (clipx/models/attention.py).
AttentionSetting = Literal["auto", "default", "math", "flash", "efficient", "cudnn", "explicit"]
ATTENTION_SETTINGS: tuple[str, ...] = typing.get_args(AttentionSetting)
# ssl.batchnorm: what a method may honour is its own subset (clipx/methods/objective.py).
BatchNormMode = Literal["local", "sync", "shuffle"]
BATCHNORM_MODES: tuple[str, ...] = typing.get_args(BatchNormMode)
# ssl.mix: i-Mix / MixCo input mixing for the contrastive losses (clipx/ssl/mixing.py).
MixMode = Literal["none", "mixup", "cutmix"]


@dataclass(frozen=True)
class ModelConfig:
    """The towers (open_clip, or a transformers text tower), their temperature, initial weights,
    locking (LiT), FLIP's patch dropout and LoRA adapters."""

    # An open_clip architecture name ("ViT-B-32", "RN50", ...) or a path to an open_clip-style model
    # JSON (embed_dim, vision_cfg, text_cfg). Relative paths resolve against the YAML file's folder.
    name: str = "ViT-B-32"
    # [run time] The resolved architecture, filled in by load_config so that a checkpoint's config.yaml
    # alone rebuilds the model, wherever the original JSON lived.
    arch: Optional[dict] = None
    # "open_clip": the text tower described by arch["text_cfg"];
    # "hf": a transformers model from a local directory (hf_text_path) plus a linear projection.
    text_tower: Literal["open_clip", "hf"] = "open_clip"
    hf_text_path: Optional[str] = None  # the transformers text model's local directory (text_tower: hf)
    hf_pooling: Literal["mean", "cls"] = "mean"  # how the transformers tower's token states become one vector
    hf_context_length: int = 64  # tokens per text for the transformers tower
    init_temperature: float = 0.07  # CLIP: 0.07 (scale 1/0.07); SigLIP: 0.1 (scale 10)
    max_logit_scale: float = 100.0  # the learned logit scale is clamped to this
    init_logit_bias: Optional[float] = None  # SigLIP's learnable bias, -10 in the paper; None: no bias
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # per-channel normalisation mean (OpenAI CLIP's)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)  # per-channel normalisation std (OpenAI CLIP's)
    # Initial weights from local disk, for training only: a clipx run or checkpoint directory, an
    # open_clip folder (open_clip_config.json + safetensors, e.g. from `clipx export`), a Hugging Face
    # CLIPModel folder, or a .safetensors file in open_clip or clipx names. The architecture must match.
    pretrained: Optional[str] = None
    # Lock (freeze) the image tower, as in LiT: all of its weights except its last
    # lock_image_unlocked_groups layer groups (stem, each block, head).
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0  # with lock_image: this many of the image tower's last groups still train
    # Lock the text tower: all of its weights except its last lock_text_unlocked_layers groups
    # (embeddings, each block, final norm + projection; a transformers tower: embeddings, each layer;
    # clipx's projection of it stays trainable).
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0  # with lock_text: this many of the text tower's last groups still train
    # FLIP (Li et al. 2023): every training forward drops this fraction of the image patches at
    # random (the class token stays), so the image tower runs on fewer tokens; evaluation sees them
    # all. 0 disables. open_clip ViT image towers only.
    patch_dropout: float = 0.0
    # FLIP's unmasked tuning: the last N optimizer steps of the run train on every patch, closing
    # the gap between masked training and unmasked evaluation.
    patch_dropout_unmasked_steps: int = 0
    # LoRA (Hu et al. 2021; clipx/models/lora.py): low-rank adapters of this rank on both towers'
    # blocks, whose base weights are then frozen (the logit scale, a transformers tower's projection
    # and heads outside the towers still train); exports merge them in. 0: off.
    lora_rank: int = 0
    # Adapter outputs are scaled by alpha / rank. Hu et al. fix alpha at the first rank tried and do
    # not tune it, so a new rank needs no new learning rate; 8 is PEFT's default (with its r = 8).
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0  # dropout on the adapters' input (Hu et al. used 0.1 on GPT-2; PEFT's default 0)
    # Which layers of each tower's blocks get adapters: attn (q/k/v and output projections), mlp.
    # Hu et al. adapt attention only; both is the common choice for vision towers (more capacity, same rank).
    lora_targets: tuple[LoraTarget, ...] = LORA_TARGETS
    # Dropout on the residual stream after each block of an open_clip text transformer of a text-only
    # model, in training only: SimCSE's one augmentation. None: [run time] the method's default (SimCSE:
    # 0.1, BERT's own rate that Gao et al. 2021 kept). A transformers tower keeps its own config's dropout.
    text_dropout: Optional[float] = None


@dataclass(frozen=True)
class DataConfig:
    """Training and validation shards (webdataset tar files, local or remote), how they are read,
    shuffled and augmented, and which texts each sample contributes."""

    train: str = ""  # shard pattern with brace expansion, e.g. "data/train/shard-{000000..000099}.tar"
    val: Optional[str] = None  # validation shards for evaluation during training
    train_num_samples: Optional[int] = None  # samples per epoch; None: [run time] sizes.json beside the shards
    # A keep-list written by `clipx curate apply` (keep.parquet, or the curation folder holding it; local
    # or remote): training reads only the samples it names, and resumes stay exact. None: every sample.
    keep: Optional[str] = None
    resampled: bool = False  # sample shards with replacement (seeded) instead of splitting them
    workers: int = 2  # data-loader worker processes per rank
    shuffle_buffer: int = 2000  # samples held in the shuffle buffer of each worker
    crop_scale_min: float = 0.9  # RandomResizedCrop lower scale bound; 1.0 disables the crop
    # Where the training images of image-text methods are decoded: "loader" (in the loader workers, a
    # JPEG at the reduced scale its crop allows) or "device" (the loader draws the crop and keeps the
    # JPEG encoded; the training device decodes the batch at once: nvJPEG on a GPU). Either way the
    # float conversion and normalisation happen on the device (clipx/data/crops.py).
    decode: Literal["loader", "device"] = "loader"
    # RandAugment (Cubuk et al. 2020; torchvision's): "N,M", N random ops at magnitude M (0..30) on
    # every training image after its crop, the SSL views and CLIP's image alike. Its draws come from
    # the per-sample seeded generator (clipx/data/pipeline.py:sample_rng). None: off.
    randaugment: Optional[str] = None
    # Several captions per sample (clipx/data/captions.py): {source: weight}, a source being "txt"
    # (the .txt member's lines), "class_prompt" (a prompt of the sample's class) or a .json field;
    # each sample draws one caption per epoch. None: the first line of the .txt.
    caption_keys: Optional[dict] = None
    # Reinforced shards (`clipx prep reinforce`): each image is one of its stored views, chosen per sample and
    # epoch (seeded), not a new crop; with distill.embedded the teachers' stored embeddings are the targets.
    reinforced: bool = False
    # Hard negatives (NegCLIP): each sample's negative caption, from its .neg.txt member ("neg.txt")
    # or a .json field, joins the text columns of the image-to-text loss. None: off.
    hard_negative_key: Optional[str] = None
    # Text pairs (loss.name simcse): a sample's second text, its supervised positive, from its
    # .pos.txt member ("pos.txt") or a .json field; a sample without one is paired with itself.
    positive_key: str = "pos.txt"
    # Training token batches end after their longest text (rounded up to 16) instead of at the
    # context length, where the text tower cannot see padding (clipx/data/tokenizer.py).
    trim_padding: bool = True
    # Stop the run when more than this share of an epoch's inputs is skipped (corrupt, undecodable,
    # captionless...): a mostly broken data set should not quietly train on what is left. None: never.
    max_skip_fraction: Optional[float] = 0.1
    allow_pipe_urls: bool = False  # shard URLs "pipe:CMD" run a shell command per shard; refused unless set
    # Remote shards' S3-compatible store (credentials come from the environment, never from here).
    # None: AWS, or AWS_ENDPOINT_URL.
    endpoint_url: Optional[str] = None
    io_timeout: float = 60.0  # remote shards: seconds to connect, and per read
    io_retries: int = 5  # remote shards: attempts per request
    io_backoff: float = 0.5  # remote shards: seconds before the first retry, doubling after each
    io_block_bytes: int = 8 << 20  # remote shards: bytes per ranged read
    cache_dir: Optional[str] = None  # a local cache of remote shards; None: no cache
    cache_bytes: Optional[int] = None  # the cache's byte budget, least recently used evicted first; None: unbounded


@dataclass(frozen=True)
class SigLip2Config:
    """loss.siglip2 (loss.name: siglip2): SigLIP's sigmoid loss plus the terms SigLIP 2 adds, each
    off at weight 0. The self-distillation and masked-prediction terms run for the last
    ``late_fraction`` of the steps, against an EMA teacher initialised from the student when they
    start; the student's local views are ssl.views (ssl.views.count crops from ssl.views.crop_scale_min)."""

    decoder_weight: float = 1.0  # LocCa: a decoder's next-token cross-entropy on the caption
    decoder_layers: Optional[int] = None  # the decoder's depth; None: the text tower's
    silc_weight: float = 1.0  # SILC: local views of the student against the teacher's global view
    tips_weight: float = 0.25  # TIPS: the student's masked patches against the teacher's patch features
    late_fraction: float = 0.2  # the share of the run, at its end, that trains the two terms above
    mask_ratio: float = 0.5  # the share of patches the student sees replaced by a mask token
    teacher_momentum: float = 0.996  # teacher <- m teacher + (1 - m) student, after every applied step
    prototypes: int = 1024  # the output width of the self-distillation heads (DINO's prototypes)
    head_hidden: int = 512  # their hidden width
    head_bottleneck: int = 128  # their normalised bottleneck width
    student_temperature: float = 0.1  # the softmax temperature of the student's head outputs
    teacher_temperature: float = 0.04  # the teacher's, lower: its targets are sharper (DINO)
    center_momentum: float = 0.9  # the teacher's output centre, an EMA of its batch means over all ranks


@dataclass(frozen=True)
class LossConfig:
    """The method (loss.name picks everything that differs between methods: model, views, loss,
    per-step state) and how its negatives are shared across ranks."""

    name: str = "clip"  # the training method (clipx/methods/__init__.py registers them)
    # none: each rank sees only its own negatives; global: full (N, N) logits on every rank;
    # local: this rank's rows against all gathered columns, (B, N) logits per rank.
    gather: GatherMode = "local"
    # slip: the weight of the image tower's SimCLR term (NT-Xent on two views, at ssl.temperature)
    # added to the CLIP loss; SLIP used 1.0.
    ssl_weight: float = 1.0
    # coca: the loss is contrastive_weight x CLIP's loss + caption_weight x the decoder's next-token
    # cross-entropy (open_clip's defaults: 1 and 2).
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0  # coca: the weight of the captioning loss (see contrastive_weight)
    siglip2: SigLip2Config = field(default_factory=SigLip2Config)


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher CLIP (clipx/methods/distill.py), on any
    image-text method, or from an ensemble: weight x KL(teachers || student) of the similarity softmaxes,
    both directions. The teachers run online (``teacher``), or ``embedded: true`` reads what ``clipx prep
    embed-teacher`` (one teacher) or ``clipx prep reinforce`` (an ensemble, per stored view) stored.
    """

    # The online teacher: a clipx run or checkpoint, an open_clip folder or a transformers
    # CLIPModel folder; several, comma-separated, are an ensemble (MobileCLIP). None: no online teacher.
    teacher: Optional[str] = None
    # Read the teachers' embeddings from the shards (prep embed-teacher's; prep reinforce's with data.reinforced).
    embedded: bool = False
    weight: float = 1.0  # the distillation term's weight (MobileCLIP's lambda)
    # The method's own loss's weight: 1 adds the two (open_clip's); 1 - weight is MobileCLIP's convex mix.
    student_weight: float = 1.0
    # An ensemble's targets: "probabilities", the mean of the teachers' softmaxes at their own temperatures
    # (MobileCLIP), or "logits", the softmax of the mean of their scaled logits.
    ensemble: Literal["probabilities", "logits"] = "probabilities"
    # Every teacher's logit scale (exp'd); None: [run time] each teacher's own (teacher.json or reinforce.json).
    teacher_logit_scale: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.teacher is not None or self.embedded


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer, schedule, precision, parallelism, checkpoints, guards and logs of a run."""

    batch_size: int = 256  # per device; per micro-batch when accum_steps > 1
    steps: Optional[int] = None  # total optimizer steps; wins over epochs
    epochs: int = 1  # passes over the training shards, when steps is not set
    lr: float = 5e-4  # AdamW's peak learning rate, after warmup; a cosine decay follows
    weight_decay: float = 0.2  # AdamW's decoupled weight decay (not on biases, norms, the logit scale)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.98  # AdamW's second-moment decay (CLIP's 0.98 for stability at large batches)
    eps: float = 1e-6  # AdamW's epsilon
    warmup_steps: int = 100  # linear learning-rate warmup from 0, in optimizer steps
    grad_clip_norm: Optional[float] = None  # clip the global gradient norm to this; None: no clipping
    # Keep an fp32 moving average of the trainable weights, ema <- d * ema + (1 - d) * w after each
    # applied step; evaluation during training and consumers (--weights auto) then use it. None: off.
    ema_decay: Optional[float] = None
    # Layer-wise learning-rate decay (BEiT) for fine-tuning pretrained towers: a tower's group k
    # levels below its head (final norm, projection) trains at lr * layer_decay**k. None or 1: off.
    layer_decay: Optional[float] = None
    # K micro-batches per optimizer step (see accum_mode).
    accum_steps: int = 1
    # features (GradCache): the loss sees all K x B samples as one batch, at micro-batch memory, for
    # one extra forward pass; naive: K separate losses of B samples each (fewer negatives: not the same
    # objective), gradients summed.
    accum_mode: Literal["features", "naive"] = "features"
    precision: Literal["no", "bf16", "fp16"] = "no"  # mixed precision (autocast); "no": fp32
    # fp16: the loss scaler's first scale. Overflowing steps halve it (they apply no update and are
    # counted as overflow_steps); 2000 clean steps double it.
    fp16_init_scale: float = 65536.0
    seed: int = 0  # seeds the model's initialisation, the data order and every augmentation draw
    # torch intra-op threads per process while the run lasts, put back when it ends;
    threads: Optional[int] = None  # None: [run time] torch's default
    # Recompute tower activations in backward instead of storing them: less memory, ~30% more compute.
    grad_checkpointing: bool = False
    # Keep freed host memory in the process during the run (glibc malloc tuning): 11% (fp32) and 14%
    # (bf16) faster CPU steps here (BENCHMARKS.md); false: freed blocks over 4 MiB go back to the system
    # at once. None: [run time] true, but false for train.sharding=fsdp on CPU processes, whose
    # per-rank peak would not fall with the ranks otherwise (at 0.66x the speed here). See
    # clipx/train/host_memory.py.
    retain_host_memory: Optional[bool] = None
    # torch.compile the model (first steps are slower while it compiles; summary.json reports it).
    # Off by default: with clipx's attention kernels it was measured not to pay on the benchmark model
    # (bf16 steps at 0.89x eager's rate after 70 s of compiling, fp32 no gain; bench/compile_ab.py).
    # Older configs' `auto` meant the same and reads as false.
    compile: bool = False
    # The scaled-dot-product attention kernel. auto: [run time] time the run's own attention calls under
    # each kernel at the first step and keep the fastest (clipx/models/attention.py); default: PyTorch's
    # rules; or one kernel by name: SDPA's, or explicit (scores, softmax, weighted sum as plain ops;
    # clipx's own towers only, others keep PyTorch's pick).
    attention: AttentionSetting = "auto"
    # ddp: every rank holds the whole model. fsdp: FSDP2 (torch's fully_shard) shards parameters,
    # gradients and optimizer state over the ranks, per transformer block and tower.
    sharding: Literal["ddp", "fsdp"] = "ddp"
    fsdp_reshard_after_forward: bool = True  # free gathered blocks after forward (less memory, one more gather)
    fsdp_cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in host memory
    output_dir: str = "runs/train"  # the run directory: checkpoints, metrics.jsonl, TensorBoard, plots
    checkpoint_every: int = 1000  # steps; the final step is always saved
    keep_checkpoints: Optional[int] = None  # newest N kept (pruned after a new one is complete); None: all
    # On SIGTERM/SIGINT, or SIGUSR1 (SLURM's --signal=USR1@120 before the time limit), every rank saves
    # at the same step and the run exits with status 75; if the save takes longer than this, the
    # process exits anyway (the previous checkpoint stays complete).
    preempt_grace_s: float = 120.0
    # Steps whose loss or gradient norm is not finite apply no update; this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # A step whose loss exceeds this multiple of the running mean loss (EMA of accepted steps) is a
    # spike: like a non-finite step it applies no update and counts towards max_nonfinite_steps.
    # Judged after loss_spike_warmup steps. None: off.
    loss_spike_factor: Optional[float] = None
    loss_spike_warmup: int = 100  # steps before loss spikes are judged
    # Write every step's sample keys to sample_keys.rank{N}.jsonl (an audit trail of what was trained on).
    log_sample_keys: bool = False
    log_every: int = 10  # steps between metrics lines (metrics.jsonl, TensorBoard)
    # Draw the run's PNG plots (RUN_DIR/plots, for `clipx report`) when it ends. Drawing takes seconds;
    # many seconds-long runs (the combination matrix) leave it off.
    plots: bool = True
    # Also log to Weights & Biases under this project (needs `pip install wandb`; offline unless
    # WANDB_MODE says otherwise). None: TensorBoard and metrics.jsonl only.
    wandb_project: Optional[str] = None
    # A collective (all-gather, all-reduce) that waits longer than this fails with an error naming
    # the rank, instead of hanging the job.
    collective_timeout_s: int = 1800


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (zero-shot classification and retrieval on data.val) and the
    classification task's classes and prompts, which the evaluators read from a checkpoint too."""

    every: int = 0  # steps between evaluations during training; 0 evaluates only after the last step
    zero_shot: bool = True  # zero-shot classification on data.val (image-text methods)
    retrieval: bool = True  # image-text retrieval on data.val (image-text methods)
    # Class names and prompt templates: a name shipped in clipx/templates ("digits", "photos", "imagenet")
    # or a path to a YAML file with `classnames` and `templates`.
    templates: str = "digits"
    label_key: str = "label"  # field of each sample's .json (or a .cls member) holding the class index (also SupCon's)
    # The task's classes, as label indices into the class names: zero-shot evaluation leaves the
    # other samples out and chooses among these classes only; a classifier (loss.name: classify)
    # has one output per class, in this order; class prompts (data.caption_keys: class_prompt) are
    # made for these. None: every class of eval.templates.
    classes: Optional[tuple] = None
    batch_size: int = 256  # evaluation batch size per device


@dataclass(frozen=True)
class ViewsConfig:
    """ssl.views: the augmented views an image-only method trains on."""

    recipe: Literal["simclr", "mocov2"] = "simclr"  # colour jitter strengths and blur of the views
    count: int = 2  # global views
    # The global views' crop lower scale bound (SimCLR: 0.08); None: [run time] data.crop_scale_min. SLIP
    # sets it apart from data.crop_scale_min, which is then the captioned image's own, milder crop.
    crop_scale_min: Optional[float] = None
    flip_prob: float = 0.5  # 0 for data where mirroring changes meaning (digits, text)
    jitter_strength: float = 1.0  # scales the recipe's colour jitter (brightness, contrast, saturation, hue)
    jitter_prob: float = 0.8  # probability that a view is colour-jittered
    grayscale_prob: float = 0.2  # probability that a view is turned grey
    blur_prob: float = 0.5  # probability that a view is Gaussian-blurred
    small_crops: int = 0  # multi-crop: extra low-resolution views (SwAV)
    small_crop_size: int = 96  # px; a multiple of the ViT patch size for open_clip encoders
    small_crop_scale: tuple = (0.05, 0.14)  # the small crops' [min, max] area scale


@dataclass(frozen=True)
class MoCoConfig:
    """ssl.moco (loss.name: moco)."""

    version: Literal[2, 3] = 2  # 2: queue of negatives; 3: no queue, symmetric loss, prediction head
    momentum: float = 0.99  # key encoder EMA: k <- m k + (1 - m) q
    momentum_cosine: bool = True  # raise m to 1 along a half cosine over the run (BYOL, MoCo v3)
    predictor_hidden: int = 512  # v3's prediction head
    queue_size: int = 4096  # v2's negatives: global, a multiple of the global batch


@dataclass(frozen=True)
class SwAVConfig:
    """ssl.swav (loss.name: swav)."""

    prototypes: int = 3000  # the number of prototype vectors (clusters)
    sinkhorn_epsilon: float = 0.05  # the entropy regularisation of the Sinkhorn-Knopp assignment
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations per assignment
    freeze_prototypes_steps: int = 0  # prototypes get zero gradient for the first steps (SwAV paper)
    # Stored embeddings per global view and rank, used in the Sinkhorn assignment once full; 0 = no queue.
    queue_size: int = 4096
    queue_start_step: int = 0  # the queue joins the assignment from this step (once full)


@dataclass(frozen=True)
class SSLConfig:
    """Image-only training on views (loss.name: ntxent | moco | swav | supcon), and what SLIP and
    SimCSE borrow from it (the temperature, the views)."""

    # "open_clip": the vision tower described by model.name; or a torchvision ResNet ("resnet18", ...).
    encoder: str = "open_clip"
    head_hidden: int = 512  # the projection head's hidden width
    head_out: int = 128  # the projection head's output width (the loss's feature dimension)
    temperature: float = 0.1  # NT-Xent, SupCon, MoCo's InfoNCE, SwAV's swapped prediction
    # BatchNorm across the batch: local (per device), sync (over all ranks; GPU only), or shuffle
    # (MoCo: the key encoder sees a random share of the global batch, so BN cannot leak the pair).
    batchnorm: BatchNormMode = "local"
    bn_splits: int = 1  # normalise this many interleaved groups of a device's batch apart (emulates devices)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    # i-Mix (Lee et al. 2021): mix each micro-batch's anchor images with a permutation of themselves
    # (mixup, or cutmix's pasted box), lambda ~ Beta(mix_alpha, mix_alpha) folded to >= 0.5, and train
    # towards the lambda-weighted pair of their sources' positives (ntxent, moco, clip).
    mix: MixMode = "none"
    mix_alpha: float = 1.0  # the Beta(alpha, alpha) that lambda is drawn from
    mix_prob: float = 1.0  # the share of micro-batches mixed
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)


@dataclass(frozen=True)
class Config:
    """A run's whole configuration: one section per dataclass above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
