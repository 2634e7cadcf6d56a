"""Objective (what a method computes per step) and Method (everything else that differs between methods).

The training loop only does ``out = objective(batch)``, backpropagates ``out["loss"]``, asks the
update guard, steps the optimizer if the guard agrees, and calls ``objective.end_step(...)``; it
never asks which method it runs. Objectives whose loss couples samples across the batch split
``__call__`` into ``features`` and ``loss_from_features``, which lets the loop cache features across
micro-batches (GradCache).

Per-step state (queues, prototypes, momentum encoders, counters) changes only when a step's update
is applied. ``loss_from_features`` may *stage* what a step would store (``self.stage``); ``after_step``
commits it, and runs only for accepted steps. Whatever was staged is dropped at the end of every
step, so a refused step (non-finite, a loss spike, an fp16 overflow) leaves no trace.
"""

from __future__ import annotations

import torch


class Objective:
    """Model + loss. Subclasses implement ``features`` and ``loss_from_features``."""

    # True when ``after_step`` only restores an invariant of the parameters (clamping the
    # temperature): after a refused step, which left them as they were, it changes nothing, so it
    # runs after every step and the loop never has to read the verdict on the host (a device sync).
    after_step_runs_after_refused_steps = False

    @property
    def reads_verdict(self) -> bool:
        """Whether ``end_step`` reads the verdict on the host: only for an ``after_step`` of its own
        that must not run after a refused step (the default one does nothing)."""
        return type(self).after_step is not Objective.after_step and not self.after_step_runs_after_refused_steps

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch -> named tensors: per-sample ones with a leading batch dim, and 0-dim scalars."""
        raise NotImplementedError

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        """features (of one or several micro-batches, concatenated) -> {"loss": scalar, "metrics": {...}}."""
        raise NotImplementedError

    def replay_features(self, batch: dict, cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``features(batch)`` again, now with autograd, for feature-cached accumulation
        (clipx/train/step.py); ``cached``: what the first, gradient-free pass returned. An objective
        may hand back cached entries that take no gradient (a frozen teacher's embeddings) rather
        than compute them twice."""
        return self.features(batch)

    def __call__(self, batch: dict) -> dict:
        return self.loss_from_features(self.features(batch))

    def stage(self, name: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (detached) for ``after_step`` of this step; dropped if the step is refused."""
        self.__dict__.setdefault("_staged", {}).setdefault(name, []).append(tensor.detach())

    def staged(self, name: str) -> list[torch.Tensor]:
        """What this step staged under ``name``, in staging order (one entry per loss evaluation)."""
        return self.__dict__.get("_staged", {}).get(name, [])

    def drop_staged(self) -> None:
        """Forget what was staged (at the end of every step, and after a forward pass that is not a step)."""
        self.__dict__.pop("_staged", None)

    def end_step(self, step: int, total_steps: int, accepted) -> None:
        """Called by the loop once per optimizer step, after the update decision: ``accepted`` is a
        bool or the guard's Verdict (whose truth value is a host read of a device flag)."""
        try:
            if not self.reads_verdict or accepted:
                self.after_step(step, total_steps)
        finally:
            self.drop_staged()

    def after_step(self, step: int, total_steps: int) -> None:
        """Runs after optimizer step number ``step`` (1-based) of ``total_steps`` was applied:
        momentum encoders and queues update here, never inside forward."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Training state outside the model (queues, counters) that a checkpoint must carry, as
        tensors; each rank saves its own."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


class Method:
    """Everything that makes a training method different, in one place; the loop, the data
    pipeline and the evaluators ask a Method, never which method runs.

    A method module subclasses this (or ImageTextMethod / ViewsMethod), and one registry line in
    clipx/methods/__init__.py names it for ``loss.name``.
    """

    # Which evaluators apply: ("zero_shot", "retrieval") run during training on data.val;
    # ("knn", "linear_probe") are run afterwards on the image encoder's features.
    evaluators: tuple[str, ...] = ()
    # The loss.gather modes the method honours; () for methods whose negatives are always global
    # (MoCo's keys, SwAV's Sinkhorn), for which loss.gather has no effect.
    gather_modes: tuple[str, ...] = ()
    # Named flavours, each as the config overrides that select it (MoCo v2 and v3). The
    # combination matrix trains every flavour; "" is the method as configured by default.
    variants: dict[str, dict] = {"": {}}
    # ssl.batchnorm settings the method can honour, and whether it takes multi-crop views.
    batchnorm_modes: tuple[str, ...] = ("local", "sync")
    multi_crop: bool = False
    # Whether its loss takes hard-negative captions (data.hard_negative_key) as extra text columns.
    hard_negatives: bool = False
    # Whether its model has a text tower (image-text methods, and a fine-tuned CLIP classifier): the
    # text-tower options (model.text_tower, model.lock_text) and tower locks apply to it.
    has_text_tower: bool = False
    # State-dict prefixes of parameters the method updates itself, outside the optimizer (MoCo's
    # momentum encoder): frozen to autograd, yet changing every step.
    updated_outside_optimizer: tuple[str, ...] = ()
    # Whether its loss has a mixed form (ssl.mix: i-Mix / MixCo, clipx/methods/mixing.py).
    mixing: bool = False
    # Whether its model is a text tower alone (SimCSE): it reads captions, never images.
    text_only: bool = False
    # Whether its training images can be decoded on the device (data.decode: device): one crop of
    # each image, made by clipx.data.crops.TrainImage and collated by clipx.data.batch.collate_images.
    decodes_on_device: bool = False
    # Whether its model reads the patch tokens of an open_clip ViT (a text decoder, masked patches:
    # CoCa, SigLIP 2): ModifiedResNets and torchvision encoders cannot serve it.
    needs_patch_tokens: bool = False
    # Whether it trains with FLIP's patch dropout (model.patch_dropout) as configured by default
    # (SigLIP 2's masked prediction must know which patches its student saw).
    takes_patch_dropout: bool = True
    # Whether its training image can be a view replayed from reinforced shards (data.reinforced): one
    # image per sample, made by ``train_transform`` (clipx.data.reinforce.ReplayedViews), not views of it.
    replays_views: bool = False
    # Whether ``prepare`` reads the weights' values (classification's zero-shot head): such a method
    # cannot be prepared on the meta device, so a sharded run builds its whole model on every rank.
    prepare_reads_weights: bool = False

    def validate(self, config) -> None:
        """Refuse, with one line, a config this method cannot train (before any process starts)."""

    def check_processes(self, config, processes: int, device_type: str) -> None:
        """Refuse what this method cannot do with ``processes`` processes on ``device_type``
        ("cpu" or "cuda"); called before the process group forms."""

    def build_model(self, config) -> torch.nn.Module:
        """The model this method trains, with random weights."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, accelerator, config) -> torch.nn.Module:
        """Changes to the model that depend on the processes (SyncBatchNorm), before it is wrapped."""
        return model

    def train_transform(self, config):
        """An image -> what a training sample holds (one tensor, or a list of augmented views). The
        image is a decoded PIL image, or the sample's encoded bytes when the transform says
        ``takes_bytes`` (clipx.data.crops.TrainImage, which decodes only what its crop needs), or
        the whole sample when it says ``takes_sample`` (clipx.data.reinforce.ReplayedViews)."""
        raise NotImplementedError

    def collate(self, config):
        """samples -> batch, with ``needs_caption`` (see clipx.data.batch)."""
        raise NotImplementedError

    def objective(self, model: torch.nn.Module, config) -> Objective:
        """The objective around an already built and prepared (possibly wrapped) model."""
        raise NotImplementedError
