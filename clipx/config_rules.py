"""The rules a run configuration must follow beyond its types: value ranges and cross-field checks.

``clipx.config.load_config`` calls ``validate`` on every Config it builds, before any model, data
loader or process group exists. What only one method requires is checked by the method
(clipx.methods.method_of). Like clipx.config, this module imports nothing of clipx but its errors,
the config file helpers and the schema, so every layer can use ``check_classes`` and ``parse_randaugment``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from clipx.config_io import suggest
from clipx.config_schema import LORA_TARGETS
from clipx.errors import ClipxError


def validate(config) -> None:
    """Check cross-field rules and value ranges; raise ClipxError on the first violation.

    What only one method requires (loss.name itself included) is checked by the method, in
    clipx.methods.method_of, which the run calls before any process group forms.
    """
    for check in (_check_counts, _check_train, _check_model, _check_data, _check_ssl, _check_distill):
        check(config)


def _check_counts(config) -> None:
    """Counts and sizes that must be positive, or not negative."""
    flat = {f"{s}.{k}": v for s, sec in dataclasses.asdict(config).items() for k, v in sec.items() if s != "ssl"}
    for key in ("train.batch_size", "train.epochs", "train.accum_steps", "train.checkpoint_every",
                "train.max_nonfinite_steps", "train.preempt_grace_s", "train.log_every", "eval.batch_size",
                "train.collective_timeout_s", "data.io_timeout", "data.io_retries", "data.io_block_bytes"):
        if flat[key] <= 0:
            raise ClipxError(f"{key} must be positive; got {flat[key]}")
    for key in ("train.steps", "train.threads", "train.grad_clip_norm", "data.train_num_samples",
                "train.keep_checkpoints", "data.cache_bytes"):
        if flat[key] is not None and flat[key] <= 0:
            raise ClipxError(f"{key} must be positive (or null); got {flat[key]}")
    for key in ("model.lock_image_unlocked_groups", "model.lock_text_unlocked_layers", "train.warmup_steps",
                "train.loss_spike_warmup", "eval.every", "data.workers", "model.patch_dropout_unmasked_steps"):
        if flat[key] < 0:
            raise ClipxError(f"{key} must not be negative; got {flat[key]}")


def _check_train(config) -> None:
    t = config.train
    if not (math.isfinite(t.fp16_init_scale) and t.fp16_init_scale > 0):
        raise ClipxError(f"train.fp16_init_scale must be a positive finite number; got {t.fp16_init_scale}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ClipxError(f"train.lr must be a positive finite number; got {t.lr}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ClipxError(f"train.ema_decay must be in (0, 1) (or null); got {t.ema_decay}")
    if t.layer_decay is not None and not 0.0 < t.layer_decay <= 1.0:
        raise ClipxError(f"train.layer_decay must be in (0, 1] (or null); got {t.layer_decay}")
    if t.loss_spike_factor is not None and not t.loss_spike_factor > 1.0:
        raise ClipxError(f"train.loss_spike_factor must be above 1 (or null); got {t.loss_spike_factor}")


def _check_model(config) -> None:
    m = config.model
    if not 0.0 <= m.patch_dropout < 1.0:
        raise ClipxError(f"model.patch_dropout must be in [0, 1); got {m.patch_dropout}")
    if m.text_dropout is not None and not 0.0 <= m.text_dropout < 1.0:
        raise ClipxError(f"model.text_dropout must be in [0, 1); got {m.text_dropout}")
    if m.text_tower == "hf" and not m.hf_text_path:
        raise ClipxError("model.text_tower is 'hf' but model.hf_text_path is not set; give the local model directory")
    _check_lora(m)


def _check_data(config) -> None:
    d = config.data
    keys = d.caption_keys
    if keys is not None and (not keys or not all(isinstance(k, str) and isinstance(w, (int, float))
                                                 and not isinstance(w, bool) and math.isfinite(w) and w > 0
                                                 for k, w in keys.items())):
        raise ClipxError(f"data.caption_keys must map caption sources (txt, or .json fields) to positive weights; "
                         f"got {keys!r}")
    if not 0.0 < d.crop_scale_min <= 1.0:
        raise ClipxError(f"data.crop_scale_min must be in (0, 1]; got {d.crop_scale_min}")
    if d.max_skip_fraction is not None and not 0.0 <= d.max_skip_fraction <= 1.0:
        raise ClipxError(f"data.max_skip_fraction must be in [0, 1] (or null); got {d.max_skip_fraction}")
    parse_randaugment(d.randaugment)
    if config.eval.classes is not None:
        check_classes(config.eval.classes, "eval.classes")


def _check_distill(config) -> None:
    d = config.distill
    if d.teacher is not None and d.embedded:
        raise ClipxError("distill.teacher (run the teacher online) and distill.embedded (read its embeddings from "
                         "the shards) exclude each other; set one")
    for name, value in (("weight", d.weight), ("student_weight", d.student_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ClipxError(f"distill.{name} must be a finite number >= 0; got {value}")
    if d.teacher is not None and not all(path.strip() for path in d.teacher.split(",")):
        raise ClipxError(f"distill.teacher names an empty path in {d.teacher!r}; give paths separated by commas")
    if d.teacher_logit_scale is not None and not d.teacher_logit_scale > 0:
        raise ClipxError(f"distill.teacher_logit_scale must be positive (or null); got {d.teacher_logit_scale}")


def check_classes(classes: Sequence, what: str) -> tuple[int, ...]:
    """``classes`` as a tuple of distinct non-negative ints; one-line ClipxError otherwise."""
    if not classes or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes) \
            or len(set(classes)) != len(classes):
        raise ClipxError(f"{what} must be distinct non-negative class indices; got {list(classes)!r}")
    return tuple(classes)


def parse_randaugment(value: Optional[str]) -> Optional[tuple[int, int]]:
    """data.randaugment "N,M" -> (N, M), None for None; one-line ClipxError otherwise."""
    if value is None:
        return None
    parts = str(value).replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[1]) > 30:
        raise ClipxError(f"data.randaugment must be \"N,M\": N >= 1 ops at magnitude M in 0..30 (e.g. \"2,9\"); "
                         f"got {value!r}")
    return int(parts[0]), int(parts[1])


def _check_lora(m) -> None:
    if m.lora_rank < 0:
        raise ClipxError(f"model.lora_rank must not be negative (0 turns LoRA off); got {m.lora_rank}")
    if not (math.isfinite(m.lora_alpha) and m.lora_alpha > 0):
        raise ClipxError(f"model.lora_alpha must be a positive finite number; got {m.lora_alpha}")
    if not 0.0 <= m.lora_dropout < 1.0:
        raise ClipxError(f"model.lora_dropout must be in [0, 1); got {m.lora_dropout}")
    for target in m.lora_targets:
        if target not in LORA_TARGETS:
            raise ClipxError(f"model.lora_targets: unknown target {target!r}{suggest(str(target), list(LORA_TARGETS))}; "
                             f"choose from {', '.join(LORA_TARGETS)}")
    if m.lora_rank and not m.lora_targets:
        raise ClipxError(f"model.lora_targets is empty; name at least one of {', '.join(LORA_TARGETS)} (or set "
                         "model.lora_rank=0)")


def _check_ssl(config) -> None:
    s, v, moco, swav = config.ssl, config.ssl.views, config.ssl.moco, config.ssl.swav
    for key, value in (("head_hidden", s.head_hidden), ("head_out", s.head_out), ("bn_splits", s.bn_splits),
                       ("views.count", v.count), ("views.small_crop_size", v.small_crop_size),
                       ("moco.predictor_hidden", moco.predictor_hidden), ("swav.prototypes", swav.prototypes),
                       ("swav.sinkhorn_iters", swav.sinkhorn_iters)):
        if value <= 0:
            raise ClipxError(f"ssl.{key} must be positive; got {value}")
    for key, value in (("views.small_crops", v.small_crops), ("moco.queue_size", moco.queue_size),
                       ("swav.queue_size", swav.queue_size), ("swav.queue_start_step", swav.queue_start_step),
                       ("swav.freeze_prototypes_steps", swav.freeze_prototypes_steps)):
        if value < 0:
            raise ClipxError(f"ssl.{key} must not be negative; got {value}")
    if not (s.temperature > 0 and swav.sinkhorn_epsilon > 0 and 0.0 <= moco.momentum <= 1.0):
        raise ClipxError("ssl.temperature and ssl.swav.sinkhorn_epsilon must be positive and ssl.moco.momentum "
                         "in [0, 1]")
    scale = v.small_crop_scale
    if len(scale) != 2 or not all(isinstance(x, (int, float)) for x in scale) or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ClipxError(f"ssl.views.small_crop_scale must be [min, max] with 0 < min <= max <= 1; got {list(scale)}")
    if v.crop_scale_min is not None and not 0.0 < v.crop_scale_min <= 1.0:
        raise ClipxError(f"ssl.views.crop_scale_min must be in (0, 1]; got {v.crop_scale_min}")
    if not (math.isfinite(s.mix_alpha) and s.mix_alpha > 0) or not 0.0 <= s.mix_prob <= 1.0:
        raise ClipxError(f"ssl.mix_alpha must be positive and ssl.mix_prob in [0, 1]; got {s.mix_alpha}, {s.mix_prob}")
    if s.batchnorm == "sync" and s.bn_splits > 1:
        raise ClipxError("ssl.bn_splits splits BatchNorm within a device; it cannot be combined with ssl.batchnorm=sync")
