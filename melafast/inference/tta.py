"""Deterministic dihedral test-time augmentation: the mean prediction over fixed flips and transposes.

The views are defined here; the loop that averages them is the one inference loop (`inference.predict_probs_multi`),
shared by every prediction path. `learn.dihedral_tta()` (in `melafast.train.learner`) runs that loop on a Learner.
"""

from __future__ import annotations

import torch

__all__ = ["dihedral_views", "dihedral_view"]

_VIEWS = {1: (0,), 2: (0, 1), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def dihedral_views(n: int) -> tuple:
    """The view indices used for `n`-way TTA: 1 identity; 2 + horizontal flip; 4 + vertical flips; 8 + transposes."""
    if n not in _VIEWS:
        from ..errors import MelafastError

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
