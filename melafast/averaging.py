"""Weight averaging: an exponential moving average (EMA) of the weights that validation and checkpoints use."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

__all__ = ["WeightEMA", "unwrap"]


def unwrap(model):
    """The model inside a DistributedDataParallel (or compiled) wrapper."""
    return getattr(model, "module", model)


class WeightEMA(Callback):
    """Keep an exponential moving average of every weight and buffer, updated after each optimizer step.

    Validation runs with the averaged weights (so the AUC, and the epoch melafast keeps, are the average's);
    training continues from the raw weights. The average spans every fit of a Learner (both phases of
    `fine_tune`). `decay` is approached gradually: min(decay, (1 + n) / (10 + n)) after n steps.
    """

    order = 70  # after the optimizer step, before the validation callbacks that read the model

    def __init__(self, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.shadow, self.steps = decay, None, 0

    def _state(self):
        return unwrap(self.learn.model).state_dict()

    def before_fit(self):
        if self.shadow is None:
            state = self._state()
            self.dtypes = {k: v.dtype for k, v in state.items()}
            self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                           for k, v in state.items()}

    @torch.no_grad()
    def after_step(self):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in self._state().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def averaged_state(self) -> dict:
        """The averaged weights, in the model's own dtypes (usable after the callback has left the Learner)."""
        return {k: v.to(self.dtypes[k]) for k, v in self.shadow.items()}

    def before_validate(self):
        if self.shadow is None:  # nothing averaged yet (validate() before any fit)
            return
        model = unwrap(self.learn.model)
        self._raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.averaged_state())

    def after_validate(self):
        raw = self.__dict__.pop("_raw", None)
        if raw is not None:
            unwrap(self.learn.model).load_state_dict(raw)
