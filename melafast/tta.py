"""Deterministic dihedral test-time augmentation: the mean prediction over fixed flips and transposes."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["dihedral_views", "dihedral_view", "predict_probs", "predict_probs_multi", "dihedral_tta"]

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


def predict_probs(model, dl, n: int = 8, amp_dtype=None, n_inp: int | None = None, progress: bool = True) -> torch.Tensor:
    """Class probabilities (N, n_out) of `model` over `dl`, averaged over `n` dihedral views of each batch.

    `dl` yields `(image, [meta], *targets)`; `n_inp` counts the inputs (default `dl.n_inp`).
    """
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    return predict_probs_multi([model], dl, [slice(None) if n_inp > 1 else None], n=n, amp_dtype=amp_dtype,
                               n_inp=n_inp, progress=progress)[0]


def predict_probs_multi(models, dl, meta_slices, n: int = 8, amp_dtype=None, n_inp: int | None = None,
                        progress: bool = True) -> list:
    """Class probabilities of several models over one pass of `dl` (each batch decoded once, each view made once).

    `dl` yields `(image, [meta], *targets)` with `n_inp` inputs (default `dl.n_inp`); model `i` gets
    `meta[:, meta_slices[i]]`, or the image only when `meta_slices[i]` is None. Returns one (N, n_out_i) tensor per
    model, averaged over `n` dihedral views (kept on the device until the end: no sync per batch).
    """
    from .progress import progress as shown

    views = dihedral_views(n)
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    device = next(models[0].parameters()).device
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    outs = [[] for _ in models]
    try:
        with torch.inference_mode(), amp:
            for batch in shown(dl, total=len(dl), label=f"TTA x{len(views)}", size=lambda b: len(b[0]),
                               display=progress):
                img, *rest = [b.to(device, non_blocking=True) for b in batch[:n_inp]]
                totals = [0.0] * len(models)
                for k in views:
                    view = dihedral_view(img, k)
                    for i, (m, sl) in enumerate(zip(models, meta_slices)):
                        args = (view,) if sl is None else (view, rest[0][:, sl])
                        totals[i] = totals[i] + torch.softmax(m(*args).float(), dim=-1)
                for i, t in enumerate(totals):
                    outs[i].append(t / len(views))
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    return [torch.cat(o).cpu() if o else torch.zeros(0, 0) for o in outs]


def _amp_dtype(learn):
    mp = getattr(learn, "mixed_precision", None)
    if mp is None:
        return None
    return torch.bfloat16 if mp.amp_mode.value == "bf16" else torch.float16


def dihedral_tta(learn, dl=None, n: int = 8, progress: bool = True) -> torch.Tensor:
    """Class probabilities over `dl` (default the validation set), the mean over `n` fixed dihedral views.

    Unlike fastai's `learn.tta()` nothing is random: the same views every time. Also `learn.dihedral_tta(...)`.
    """
    dl = learn.dls.valid if dl is None else dl
    return predict_probs(learn.model, dl, n=n, amp_dtype=_amp_dtype(learn), n_inp=learn.dls.n_inp, progress=progress)
