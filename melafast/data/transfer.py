"""Batches reach the device without making the host wait: pinned memory, copied with `non_blocking=True`.

fastai's DataLoader copies each batch with a blocking `.to(device)`; `async_copies` puts `AsyncToDevice` first in
the batch transforms instead, so the host queues the next batch while the copy runs (see `melafast.train.hostsync`
for the rest of a training step's host syncs).
"""

from __future__ import annotations

import torch
from fasttransform import Transform

__all__ = ["AsyncToDevice", "async_copies", "async_copy_dl"]


class AsyncToDevice(Transform):
    """First batch transform: copy the (pinned) batch to `device` without making the host wait."""

    order = -100  # before every other batch transform, which then run on the device

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def encodes(self, x: torch.Tensor):
        return x.to(self.device, non_blocking=True)


def async_copies(dls, device):
    """Move `dls`' batches to `device` through `AsyncToDevice` instead of fastai's blocking copy.

    Each DataLoader keeps no device of its own (so fastai does not copy first); `dls.device` still says `device`.
    """
    for dl in dls.loaders:
        async_copy_dl(dl, device)
    dls._device = torch.device(device)
    return dls


def async_copy_dl(dl, device):
    """The same for one DataLoader (e.g. an inference one): batches reach `device` through `AsyncToDevice`."""
    dl.after_batch.add(AsyncToDevice(device))
    dl._device = None
    return dl
