"""A trained model's encoders as evaluation and ``clipx encode`` run them: in an inference precision,
each tower with the attention kernel measured for its own calls."""

from __future__ import annotations

import torch

from clipx.models.attention import AttentionKernel
from clipx.precision import inference_autocast


class InferenceEncoder:
    """``encode_image`` / ``encode_text`` of ``model`` under ``precision`` (fp32 or bf16), returning
    fp32 features; every other attribute (eval, train, feature_dim, ...) is the model's own.

    The attention kernel is chosen per tower (forward only: there is no backward here). A sharded
    evaluation calls ``settle`` on every rank first, so that all ranks use rank 0's choice; a tower
    still unsettled at its first call (a single process) chooses there, alone.
    """

    def __init__(self, model: torch.nn.Module, device, precision: str = "fp32", attention: str = "auto"):
        inference_autocast(device, precision)  # refuses an unknown precision now, not at the first batch
        self.model, self.device, self.precision = model, device, precision
        self.kernels = {"image": AttentionKernel(attention), "text": AttentionKernel(attention)}

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) fp32."""
        return self._encode("image", self.model.encode_image, images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, E) fp32."""
        return self._encode("text", self.model.encode_text, tokens)

    def settle(self, examples: dict[str, torch.Tensor]) -> dict[str, str]:
        """Choose each tower's kernel with the calls of encoding ``examples`` ({"image": (B, 3, H, W),
        "text": (B, L)}, inputs of the shapes the run will encode): every rank must call this, with
        inputs of the same shapes; rank 0 measures and every rank adopts its choice. Ranks that
        measured alone once chose differently (close forward timings), and a sharded evaluation's
        features then differed from a single process's. Returns {tower: kernel}.

        The example passes run in eval mode whatever mode the model is in (evaluation during training
        hands over a training model): they must not move BatchNorm statistics, nor drop patches."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), inference_autocast(self.device, self.precision):
                for tower, inputs in examples.items():
                    encode = getattr(self.model, f"encode_{tower}")
                    self.kernels[tower].settle(lambda: encode(inputs), backward=False, share=True)
        finally:
            self.model.train(was_training)
        return {tower: self.kernels[tower].kernel for tower in examples}

    def _encode(self, tower: str, encode, inputs: torch.Tensor) -> torch.Tensor:
        kernel = self.kernels[tower]
        with torch.no_grad(), inference_autocast(self.device, self.precision):
            if not kernel.settled:
                kernel.settle(lambda: encode(inputs), backward=False, share=False)
            with kernel.scope():
                return encode(inputs).float()
