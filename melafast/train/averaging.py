"""Weight averaging that validation and checkpoints use: an exponential moving average (EMA) updated every step,
or stochastic weight averaging (SWA) of the weights at the end of the last epochs."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

__all__ = ["WeightEMA", "WeightSWA", "recompute_bn", "unwrap"]


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
        state = self._state()
        # fp32 tensors (weights, batch-norm statistics) in a few fused kernels; the rest one by one
        fast = [k for k, v in state.items() if v.dtype == torch.float32 and v.device == self.shadow[k].device]
        if fast:
            torch._foreach_lerp_([self.shadow[k] for k in fast], [state[k].detach() for k in fast], 1 - d)
        fast = set(fast)
        for k, v in state.items():
            if k in fast:
                continue
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


class WeightSWA(Callback):
    """Stochastic weight averaging: the equal-weight mean of the weights at the end of the last `epochs` epochs.

    The average restarts with every fit, so after `fine_tune` it covers the last epochs of the unfrozen phase.
    Nothing changes during training; after the fit call `apply(learn)`, which loads the average and recomputes
    the batch-norm statistics for it (averaged weights do not fit the running statistics of any one epoch).
    """

    order = 70

    def __init__(self, epochs: int):
        if epochs < 1:
            raise ValueError(f"SWA needs at least one epoch to average, got {epochs}")
        self.epochs, self.avg, self.count = epochs, None, 0

    def before_fit(self):
        self.avg, self.count = None, 0

    @torch.no_grad()
    def after_epoch(self):
        if self.epoch < self.n_epoch - self.epochs:
            return
        state = unwrap(self.learn.model).state_dict()
        if self.avg is None:
            self.avg = {k: v.detach().float().clone() for k, v in state.items() if v.is_floating_point()}
        else:
            for k, a in self.avg.items():
                a.add_(state[k].detach().float() - a, alpha=1 / (self.count + 1))
        self.count += 1

    def apply(self, learn, progress: bool = True) -> int:
        """Load the average into `learn.model` and recompute batch-norm statistics; returns the epochs averaged."""
        if not self.count:
            return 0
        model = unwrap(learn.model)
        state = model.state_dict()
        model.load_state_dict({k: self.avg[k].to(v.dtype) if k in self.avg else v for k, v in state.items()})
        recompute_bn(learn, progress=progress)
        return self.count


@torch.no_grad()
def recompute_bn(learn, dl=None, progress: bool = True):
    """Batch-norm running statistics of `learn.model` computed afresh: a cumulative average over one pass of `dl`
    (default the training DataLoader, augmented as in training). With several processes the statistics are
    averaged across them, so every process ends with the same model."""
    import contextlib

    from ..processes import world_size
    from ..progress import progress as shown

    model = unwrap(learn.model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    dl = learn.dls.train if dl is None else dl
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    device = next(model.parameters()).device
    amp = getattr(learn, "precision", "fp32")
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
           if amp in ("bf16", "fp16") and device.type == "cuda" else contextlib.nullcontext())
    was_training, n_inp = model.training, learn.dls.n_inp
    model.train()
    try:
        with ctx:
            for batch in shown(dl, total=len(dl), label="batch-norm statistics", size=lambda b: len(b[0]),
                               display=progress):
                model(*[b.to(device, non_blocking=True) for b in batch[:n_inp]])
    finally:
        model.train(was_training)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    if world_size() > 1:
        import torch.distributed as dist

        for m in bns:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world_size())
