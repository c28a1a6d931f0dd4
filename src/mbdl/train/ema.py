"""An exponential moving average of the weights (``train.ema``), as a callback.

After every optimiser step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point
entry of the model's state (parameters and buffers such as batch-norm statistics; integer
buffers are copied), starting from the weights the run starts with. The average is what gets
validated, selected into ``best.pt`` (and so tested and exported); ``last.pt`` keeps the
training weights and the average (``callbacks["ExponentialMovingAverage"]``), so a resumed run
continues both exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from mbdl.errors import UserError
from mbdl.train.callbacks import Callback

if TYPE_CHECKING:
    from mbdl.train.trainer import Trainer


class ExponentialMovingAverage(Callback):
    """The EMA of ``trainer.model``'s weights with ``decay`` in (0, 1)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"the EMA decay must be in (0, 1); got {decay!r}")
        self.decay = float(decay)
        self.average: dict[str, torch.Tensor] = {}
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = dict(state["average"])
        self.updates = int(state["updates"])

    def on_train_start(self, trainer: Trainer) -> None:
        weights = trainer.model.state_dict()
        if not self.average:  # a fresh run: the average starts at the initial weights
            self.average = {k: v.detach().clone() for k, v in weights.items()}
        elif set(self.average) != set(weights) or any(
            self.average[k].shape != v.shape for k, v in weights.items()
        ):
            raise UserError("the checkpoint's EMA weights do not match the model")
        else:  # resumed: on the model's device
            self.average = {k: self.average[k].to(v.device) for k, v in weights.items()}

    @torch.no_grad()
    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        for name, value in trainer.model.state_dict().items():
            average = self.average[name]
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(value)
        self.updates += 1

    @contextlib.contextmanager
    def evaluation_weights(self, trainer: Trainer) -> Iterator[None]:
        """The model holds the average inside the context, its training weights again after."""
        training = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.model.load_state_dict(self.average)
        try:
            yield
        finally:
            trainer.model.load_state_dict(training)


__all__ = ["ExponentialMovingAverage"]
