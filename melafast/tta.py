"""Deterministic dihedral test-time augmentation: the mean prediction over fixed flips and transposes.

The views are defined here; the loop that averages them is the one inference loop (`inference.predict_probs_multi`),
shared by every prediction path. `learn.dihedral_tta()` is attached to fastai's `Learner` with `@patch`.
"""

from __future__ import annotations

import torch
from fastai.learner import Learner
from fastcore.basics import patch

__all__ = ["dihedral_views", "dihedral_view", "dihedral_tta"]

_VIEWS = {1: (0,), 2: (0, 1), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def dihedral_views(n: int) -> tuple:
    """The view indices used for `n`-way TTA: 1 identity; 2 + horizontal flip; 4 + vertical flips; 8 + transposes."""
    if n not in _VIEWS:
        from .errors import MelafastError

        raise MelafastError(f"--tta must be 1, 2, 4 or 8, got {n}")
    return _VIEWS[n]


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View `k` (0-7) of a batch of images (N, C, H, W): bit 4 transposes, bit 1 flips W, bit 2 flips H."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def _amp_dtype(learn):
    mp = getattr(learn, "mixed_precision", None)
    if mp is None:
        return None
    return torch.bfloat16 if mp.amp_mode.value == "bf16" else torch.float16


@patch
def dihedral_tta(self: Learner, dl=None, n: int = 8, progress: bool = True) -> torch.Tensor:
    """Class probabilities over `dl` (default the validation set), the mean over `n` fixed dihedral views.

    Unlike fastai's `learn.tta()` nothing is random: the same views every time, in the learner's own precision.
    Also `dihedral_tta(learn, ...)`.
    """
    from .inference import predict_probs

    dl = self.dls.valid if dl is None else dl
    model = getattr(self.model, "module", self.model)  # inside DistributedDataParallel while a fit runs
    return predict_probs(model, dl, n=n, amp_dtype=_amp_dtype(self), n_inp=self.dls.n_inp, progress=progress)


dihedral_tta = Learner.dihedral_tta  # noqa: F811 (fastcore's @patch returns nothing: the function, callable as dihedral_tta(learn)


def __getattr__(name):  # the loop lived here before melafast.inference: keep old imports working
    if name in ("predict_probs", "predict_probs_multi"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
