"""What the applications hand a training run (``clipx.train.loop.RunHooks``): evaluation of data.val
during training and the run's plots. Training itself imports no evaluator and no report
(docs/ARCHITECTURE.md, Layers); `clipx train` (and through it `python -m clipx.train`), the demo and
the tests' runs pass ``run_hooks()``."""

from __future__ import annotations

import torch

from clipx.apps.report.plots import write_plots
from clipx.data.opener import ShardOpener
from clipx.data.tokenizer import Tokenizer
from clipx.train.loop import Evaluation, RunHooks, Trainer
from eval import run as evaluators  # looked up at each call: tests replace evaluators.evaluate


def run_hooks() -> RunHooks:
    """The command line's: zero-shot and retrieval on data.val during training, plots at the end."""
    return RunHooks(evaluate=evaluate_during_training, plots=write_plots)


def evaluate_during_training(model: torch.nn.Module, trainer: Trainer) -> Evaluation:
    """Zero-shot and retrieval on data.val with ``model``, sharded across all ranks (each embeds its
    share), as far as eval.zero_shot, eval.retrieval and the method's evaluators ask for them."""
    method, config, e = trainer.method, trainer.config, trainer.config.eval
    results = evaluators.evaluate(
        model, Tokenizer(config.model), config.model, config.data.val, trainer.accelerator.device,
        e.zero_shot and "zero_shot" in method.evaluators, e.retrieval and "retrieval" in method.evaluators,
        e.templates, e.label_key, e.batch_size, config.data.workers, ShardOpener.from_config(config.data),
        # bf16 training evaluates in bf16 too; fp32 and fp16 runs evaluate in fp32.
        precision="bf16" if config.train.precision == "bf16" else "fp32", classes=e.classes)
    return Evaluation(results, evaluators.flatten_metrics(results))
