"""Keep the host from waiting on the GPU: fastai reads a value back from the device on every batch.

Out of the box a fastai training batch makes the CPU wait for the GPU to finish all queued work several times:
the blocking host-to-device copy of the batch, the smoothed loss moved to the CPU (`Recorder`), the progress bar
printing that loss (`ProgressCallback`), and, on validation batches, the loss and the metric moved to the CPU.
While the CPU waits it cannot queue the next batch, so the GPU idles for the Python time of every step.

melafast keeps these values on the device and reads them once per epoch (the progress bar once a second), and
copies batches from pinned memory without blocking. `melanoma_learner` and `melanoma_dls` apply all of it.
"""

from __future__ import annotations

import time

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgLoss, AvgSmoothLoss
from fastai.torch_core import find_bs

__all__ = ["DeviceSmoothLoss", "DeviceAvgLoss", "LazyProgress", "sync_free"]


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's exponentially smoothed training loss, kept on the loss's device (no host sync per batch).

    With several processes each smooths its own loss (fastai gathers them every batch, itself a sync); rank 0's
    is the one logged. The validation loss and the AUC are still computed over every process's batches.
    """

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.detach().float().mean()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's validation loss average, summed on the device and read once at the end of validation."""

    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total = self.total + learn.to_detach(learn.loss.detach().float().mean(), cpu=False) * bs
        self.count += bs


class LazyProgress(ProgressCallback):
    """fastai's progress bars, reading the smoothed loss for the bar's comment at most once a second."""

    @property
    def name(self):
        return "progress"  # the name fastai's `no_bar()` and `learn.progress` look for

    def _launch_pbar(self):
        super()._launch_pbar()
        self._shown = 0.0

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        now = time.monotonic()
        if self.training and now - self._shown >= 1.0 and hasattr(self, "smooth_loss"):
            self.pbar.comment = f"{float(self.smooth_loss):.4f}"
            self._shown = now


class _LossesToFloats(Callback):
    "Turn the Recorder's per-batch device losses into floats at the end of each epoch and fit (plots want numbers)."

    order = 51  # after the Recorder

    def _convert(self):
        losses = getattr(getattr(self.learn, "recorder", None), "losses", None) or []
        idx = [i for i, v in enumerate(losses) if isinstance(v, torch.Tensor)]
        if idx:
            values = torch.stack([losses[i].detach().float().reshape(()) for i in idx]).cpu().tolist()  # one read
            for i, v in zip(idx, values):
                losses[i] = v

    def after_epoch(self):
        self._convert()

    def after_fit(self):
        self._convert()


def sync_free(learn):
    """Make `learn` read the loss and metrics back from the device once per epoch instead of once per batch."""
    rec = learn.recorder
    rec.smooth_loss = DeviceSmoothLoss(beta=rec.smooth_loss.beta)
    rec.loss = DeviceAvgLoss()
    if hasattr(learn, "progress"):
        learn.remove_cb(ProgressCallback)
        learn.add_cb(LazyProgress())
    learn.add_cb(_LossesToFloats())
    return learn
