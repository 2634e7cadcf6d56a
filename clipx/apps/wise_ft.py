"""WiSE-FT: the weights (1 - alpha) * zero-shot + alpha * fine-tuned, and the curve they trace.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (CVPR; arXiv:2109.01903): averaging
the weights of a zero-shot CLIP and of its fine-tuned descendant keeps most of the fine-tuned
accuracy on the task while recovering much of the zero-shot model's robustness on other
distributions and tasks. The two models must share one architecture and the fine-tuned one must
have started from the zero-shot one (the average of unrelated networks is noise).

A fine-tuned classifier (``loss.name: classify``) has a head the zero-shot CLIP lacks. Its zero-shot
end is the head it started as (clipx.methods.classify): the zero-shot classifier of the fine-tuned
config's task (eval.templates, eval.classes) under the zero-shot model's text tower, times its logit
scale, bias 0. So alpha = 0 classifies exactly as the zero-shot model does on the task's classes, and
alpha = 1 is the fine-tuned checkpoint bit for bit. A contrastively fine-tuned CLIP (FLYP) has the
zero-shot model's keys only, and every weight is interpolated.

alpha is kept within [0, 1]: the paper studies the segment between the two models (its
recommended mixing is alpha = 0.5), points beyond the fine-tuned end move further away from the
zero-shot weights, which costs the robustness WiSE-FT is for, and an out-of-range value is more often
a typo (5 for 0.5) than a wish, so it is refused rather than extrapolated.

This module holds the weights (the two ends, one alpha, the written checkpoint); the curve over many
alphas is clipx.apps.wise_ft_curve, whose names it re-exports for the command and the run report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from clipx.api import choose_weights, load_model
from clipx.apps.wise_ft_curve import (
    CURVE_JSON,
    CURVE_PNG,
    EvalSet,
    curve_png,
    curve_table,
    evaluate_curve,
    held_out_sets,
    plot_curve,
    read_curve,
    wise_ft_curve,
    write_curve,
)
from clipx.config import Config
from clipx.errors import ClipxError
from clipx.fileio import replace_atomically
from clipx.methods import build_model
from clipx.models.classifier import DualEncoderWithClassifier
from clipx.models.dual_encoder import DualEncoder
from clipx.models.lora import merged_state_dict
from clipx.run_layout import MODEL_WEIGHTS, as_checkpoint

PROVENANCE = "provenance.json"  # beside a written checkpoint: how it was made; marks the folder as wise-ft's
MADE_BY = "clipx wise-ft"
HEAD_KEYS = ("head.weight", "head.bias")
MAX_ALPHAS = 1001


# ---- alpha ----------------------------------------------------------------------------------------

def check_alpha(alpha: float, what: str = "--alpha") -> float:
    """``alpha`` if it lies in [0, 1]; a one-line ClipxError otherwise (no extrapolation, see above)."""
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise ClipxError(f"{what} {alpha} is outside [0, 1]: 0 is the zero-shot model, 1 the fine-tuned one, and "
                         "WiSE-FT does not extrapolate beyond them")
    return float(alpha)


def parse_alphas(text: str) -> list[float]:
    """``"0:1:0.1"`` (START:STOP:STEP, STOP included when it lies on the grid) or ``"0,0.5,1"`` ->
    the sorted distinct alphas. Grid points are rounded to 12 decimals, so 0:1:0.1 gives 0.3, not
    0.30000000000000004, and ends exactly at 1."""
    usage = f"--alphas {text!r}: give START:STOP:STEP (0:1:0.1, STOP included) or a comma list (0,0.5,1)"
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if not step > 0 or stop < start:
                raise ClipxError(f"{usage}, with STEP > 0 and START <= STOP")
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > MAX_ALPHAS:
                raise ClipxError(f"{usage}: that is {count} points; at most {MAX_ALPHAS}")
            values = [round(start + i * step, 12) for i in range(count)]
            if abs(values[-1] - stop) < 1e-9:
                values[-1] = stop
        else:
            values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ClipxError(usage) from None
    if not values:
        raise ClipxError(usage)
    return sorted({check_alpha(value, "--alphas value") for value in values})


# ---- the two ends and the line between them ------------------------------------------------------

@dataclass
class Endpoints:
    """Both ends of WiSE-FT's line in the fine-tuned model's keys. ``model`` is the fine-tuned
    architecture (on the evaluation device), which ``at`` fills with the weights of one alpha."""

    model: nn.Module
    config: Config  # the fine-tuned checkpoint's: what every written checkpoint carries
    start: dict[str, torch.Tensor]  # alpha = 0: the zero-shot weights (the head: its zero-shot classifier)
    end: dict[str, torch.Tensor]  # alpha = 1: the fine-tuned weights
    sources: dict  # paths and which weights (raw, ema) of each: provenance

    def state_at(self, alpha: float) -> dict[str, torch.Tensor]:
        """The state dict (1 - alpha) * start + alpha * end; non-float buffers are the fine-tuned ones."""
        check_alpha(alpha)
        return {key: _blend(self.start[key], end, alpha) for key, end in self.end.items()}

    def at(self, alpha: float) -> nn.Module:
        self.model.load_state_dict(self.state_at(alpha), strict=True)
        return self.model.eval()


def _blend(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * a + alpha * b in at least fp32, in b's dtype; the ends exactly a and b."""
    if not b.is_floating_point() or alpha == 1.0:
        return b
    if alpha == 0.0:
        return a.to(b.dtype)
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return (a.to(wide) * (1.0 - alpha) + b.to(wide) * alpha).to(b.dtype)


def _checkpoint(path: str | Path, flag: str) -> Path:
    try:
        return as_checkpoint(path)
    except ClipxError as error:
        raise ClipxError(f"{flag}: {error}") from None


def load_endpoints(zero_shot: str | Path, fine_tuned: str | Path, weights: str = "auto",
                   device: str | torch.device = "cpu") -> Endpoints:
    """Read both checkpoints (runs: their newest) and line their weights up key by key.

    Every key of the fine-tuned model must be in the zero-shot one with the same shape, except a
    classifier's head, whose zero-shot end is built (see the module docstring); anything else is a
    one-line ClipxError naming the key. Keys only the zero-shot model has (a SLIP view head) are left out.
    """
    a_path, b_path = _checkpoint(zero_shot, "--zero-shot"), _checkpoint(fine_tuned, "--fine-tuned")
    a_weights, b_weights = choose_weights(a_path, weights), choose_weights(b_path, weights)
    a_model, a_config = load_model(a_path, "cpu", a_weights)
    b_model, b_config = load_model(b_path, "cpu", b_weights)
    a_model, _ = without_adapters(a_model, a_config)
    b_model, b_config = without_adapters(b_model, b_config)
    end = {key: value.detach().clone() for key, value in b_model.state_dict().items()}
    a_state = a_model.state_dict()
    built_head = [key for key in end if key in HEAD_KEYS and key not in a_state and hasattr(b_model, "set_head_")]
    for key, b in end.items():
        a = a_state.get(key)
        if a is None and key not in built_head:
            raise ClipxError(f"the zero-shot checkpoint {a_path} has no {key}, which the fine-tuned {b_path} has: "
                             "WiSE-FT needs the fine-tuned model's architecture and its starting point")
        if a is not None and a.shape != b.shape:
            raise ClipxError(f"{key} is {tuple(a.shape)} in the zero-shot checkpoint {a_path} but {tuple(b.shape)} "
                             f"in the fine-tuned {b_path}: different architectures cannot be interpolated")
    if "head.weight" in a_state and getattr(a_model, "classes", None) != getattr(b_model, "classes", None):
        raise ClipxError(f"the zero-shot checkpoint {a_path} has a head over other classes than {b_path}'s")
    b_model.to(device)
    start = {key: a_state[key] for key in end if key not in built_head}
    if built_head:
        start.update(_zero_shot_head(a_model.to(device), b_model, b_config, device))
    sources = {"zero_shot": str(a_path), "fine_tuned": str(b_path),
               "weights": {"zero_shot": a_weights, "fine_tuned": b_weights}}
    return Endpoints(b_model, b_config, start, end, sources)


def without_adapters(model: nn.Module, config: Config) -> tuple[nn.Module, Config]:
    """A LoRA model (model.lora_rank > 0) as the plain model it computes: every adapter folded into the
    weight it adapts, and a config without adapters. WiSE-FT interpolates weights, and a low-rank
    product B·A is not linear in its factors, so the line runs between merged models; the written
    checkpoint is then a plain one. Any other model comes back as it is."""
    if not config.model.lora_rank:
        return model, config
    plain_config = replace(config, model=replace(config.model, lora_rank=0))
    plain = build_model(plain_config)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.eval(), plain_config


def _zero_shot_head(zero_shot: DualEncoder, classifier: DualEncoderWithClassifier, config, device) -> dict[str, torch.Tensor]:
    """head.weight (C, E) and head.bias (C,) as classification fine-tuning started them
    (clipx.methods.classify.Classify.prepare): the task's zero-shot classifier under the zero-shot
    model's text tower, times its logit scale, bias 0. Written by the classifier's own set_head_
    (its head is overwritten here; ``Endpoints.at`` loads every weight anyway)."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.methods.classify import task_classes
    from clipx.models.classifier import zero_shot_weights

    classnames, templates, classes = task_classes(config)
    weights = zero_shot_weights(zero_shot, Tokenizer(config.model), [classnames[c] for c in classes], templates,
                                device)  # (C, E)
    classifier.set_head_(weights.to(device), zero_shot.scale().item())
    return {key: value.detach().cpu().clone() for key, value in classifier.state_dict().items() if key in HEAD_KEYS}


def interpolate(zero_shot: str | Path, fine_tuned: str | Path, alpha: float, weights: str = "auto",
                device: str | torch.device = "cpu"):
    """(model in eval mode, config): the fine-tuned architecture with the weights
    (1 - alpha) * zero-shot + alpha * fine-tuned, and the fine-tuned checkpoint's config."""
    check_alpha(alpha)
    ends = load_endpoints(zero_shot, fine_tuned, weights, device)
    return ends.at(alpha), ends.config


# ---- writing ----------------------------------------------------------------------------------------

def check_checkpoint_out(out: str | Path) -> Path:
    """``out`` if a checkpoint may be written there: a new or plain folder, or one wise-ft wrote before.
    A training run or another checkpoint (the inputs themselves included) is refused, so nothing is lost."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClipxError(f"--out {out} is a file; give a folder for the checkpoint")
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise ClipxError(f"--out {out} is a training run; write the interpolated checkpoint to a folder of its own")
    if ((out / MODEL_WEIGHTS).exists() or (out / "config.yaml").exists()) and not _written_by_us(out):
        raise ClipxError(f"--out {out} already holds a checkpoint that clipx wise-ft did not write; choose another "
                         "folder")
    return out


def _written_by_us(folder: Path) -> bool:
    try:
        return json.loads((folder / PROVENANCE).read_text()).get("made_by") == MADE_BY
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint(model: nn.Module, config, out: str | Path, provenance: dict) -> Path:
    """Write ``model`` as a clipx checkpoint (model.safetensors + config.yaml, which every consumer
    reads) and provenance.json. Each file goes through a temporary name, fsync and rename; the
    config goes last, so a new folder becomes a checkpoint only once its weights are whole."""
    from safetensors.torch import save_file

    from clipx.config import dump_config

    out = check_checkpoint_out(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    replace_atomically(out / MODEL_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"made_by": MADE_BY}))
    record = {"made_by": MADE_BY, **provenance}
    replace_atomically(out / PROVENANCE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    replace_atomically(out / "config.yaml", lambda tmp: dump_config(config, tmp))
    return out


__all__ = ["CURVE_JSON", "CURVE_PNG", "EvalSet", "Endpoints", "check_alpha", "check_checkpoint_out", "curve_png",
           "curve_table", "evaluate_curve", "held_out_sets", "interpolate", "load_endpoints", "parse_alphas",
           "plot_curve", "read_curve", "wise_ft_curve", "without_adapters", "write_checkpoint", "write_curve"]
