"""The inference loop: dihedral TTA over batches streamed from disk, several models sharing one pass over the images."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .tta import dihedral_view, dihedral_views
from .inputs import model_table
from .settings import prepare_model, default_device, resolve_settings

__all__ = ["predict_probs_multi", "predict_probs", "predict_many", "image_features", "model_batch", "prepare_models"]


def predict_probs_multi(models, dl, meta_slices, n: int = 8, amp_dtype=None, n_inp: int | None = None,
                        progress: bool = True, blanks=None, patterns=None):
    """Class probabilities of several models over one pass of `dl` (each batch decoded once, each view made once).

    `dl` yields `(image, [meta], *targets)` with `n_inp` inputs (default `dl.n_inp`); model `i` gets
    `meta[:, meta_slices[i]]`, or the image only when `meta_slices[i]` is None. `amp_dtype` is one autocast dtype
    for all models or a list (None: fp32). Returns one (N, n_out_i) tensor per model, averaged over `n` dihedral
    views (kept on the device until the end: no sync per batch). With `blanks` (one `MetaProcessor` or None per
    model) it returns a second list too: the same models with patient fields blanked, from the same image features,
    as for a patient who comes without them. `patterns` (a list of column lists; None in it or by default: every
    patient field) says which fields; then each item of the second list is one tensor per pattern (None for a model
    without metadata), else one tensor.
    """
    from ..progress import progress as shown

    views = dihedral_views(n)
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    device = next(models[0].parameters()).device
    amps = amp_dtype if isinstance(amp_dtype, (list, tuple)) else [amp_dtype] * len(models)
    blanks = blanks or [None] * len(models)
    pats = list(patterns) if patterns is not None else [None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    outs, blank_outs = [[] for _ in models], [[[] for _ in pats] for _ in models]
    try:
        with torch.inference_mode():
            for batch in shown(dl, total=len(dl), label=f"TTA x{len(views)}", size=lambda b: len(b[0]),
                               display=progress):
                img, *rest = [b.to(device, non_blocking=True) for b in batch[:n_inp]]
                totals = [0.0] * len(models)
                blank_totals = [[0.0] * len(pats) for _ in models]
                for k in views:
                    view = dihedral_view(img, k)
                    for i, (m, sl, amp, proc) in enumerate(zip(models, meta_slices, amps, blanks)):
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            meta = None if sl is None else rest[0][:, sl]
                            feats = m.image_features(view)
                            totals[i] = totals[i] + torch.softmax(m.classify(feats, meta).float(), dim=-1)
                            for j, cols in enumerate(pats if proc is not None else ()):
                                blank = m.classify(feats, proc.blank(meta.as_subclass(torch.Tensor), cols))
                                blank_totals[i][j] = blank_totals[i][j] + torch.softmax(blank.float(), dim=-1)
                for i in range(len(models)):
                    outs[i].append(totals[i] / len(views))
                    if blanks[i] is not None:
                        for j in range(len(pats)):
                            blank_outs[i][j].append(blank_totals[i][j] / len(views))
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    probs = [torch.cat(o).cpu() if o else torch.zeros(0, 0) for o in outs]
    if not any(b is not None for b in blanks):
        return probs
    blanked = [[torch.cat(o).cpu() if o else None for o in per] if b is not None else None
               for per, b in zip(blank_outs, blanks)]
    return probs, (blanked if patterns is not None else [None if b is None else b[0] for b in blanked])


def predict_probs(model, dl, n: int = 8, amp_dtype=None, n_inp: int | None = None, progress: bool = True) -> torch.Tensor:
    """Class probabilities (N, n_out) of `model` over `dl`, averaged over `n` dihedral views of each batch.

    `dl` yields `(image, [meta], *targets)`; `n_inp` counts the inputs (default `dl.n_inp`).
    """
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    return predict_probs_multi([model], dl, [slice(None) if n_inp > 1 else None], n=n, amp_dtype=amp_dtype,
                               n_inp=n_inp, progress=progress)[0]


def predict_many(predictors: list, df: pd.DataFrame, tta: int = 8, bs: int = 64, num_workers: int | None = None,
                 device=None, progress: bool = True, precision: str | None = None, log=None, blank=False,
                 prepared: bool = False):
    """Melanoma probabilities of every predictor for the rows of `df` (one array each), decoding each image once
    per input size rather than once per model: the fold models of a run share one pass over the images.

    Each model runs with the precision and memory layout it was validated with (see `resolve_settings`);
    `precision` overrides them. `log` receives a line when a model cannot run as validated (default: a warning).
    With `blank=True` it returns a second list from the same pass: each model's probabilities with every patient
    field blanked (None for an image-only model), as `train` scores its out-of-fold rows without metadata. With
    `blank` a dict (name -> the columns to blank, None for every patient field), the second item is a dict instead:
    name -> one array per model, each missing-field pattern scored from the same image features. `prepared`: `df`
    is already a `model_table` of these predictors.
    """
    from ..data import MetaStack, inference_dl

    patterns = dict(blank) if isinstance(blank, dict) else ({"all": None} if blank else {})
    df = df if prepared else model_table(predictors, df)
    device = torch.device(device) if device is not None else default_device()
    out = [None] * len(predictors)
    out_blank = {name: [None] * len(predictors) for name in patterns}
    notes = []
    for size in sorted({p.spec.size for p in predictors}):
        idx = [i for i, p in enumerate(predictors) if p.spec.size == size]
        stack = MetaStack([predictors[i].meta_proc for i in idx])
        dl = inference_dl(df, size, stack if stack.procs else None, bs=bs, num_workers=num_workers, device=device)
        settings = prepare_models([predictors[i] for i in idx], device, precision)
        amps = [s.amp_dtype for s in settings]
        notes += [n for n in dict.fromkeys(s.note for s in settings) if n and n not in notes]
        procs = [predictors[i].meta_proc for i in idx] if patterns else None
        probs = predict_probs_multi([predictors[i].model for i in idx], dl, stack.slices, n=tta, amp_dtype=amps,
                                    progress=progress, blanks=procs if procs and any(procs) else None,
                                    patterns=list(patterns.values()) if patterns else None)
        probs, blanked = probs if isinstance(probs, tuple) else (probs, [None] * len(idx))
        for i, pr, pb in zip(idx, probs, blanked):
            pos = predictors[i].spec.pos
            out[i] = pr[:, pos].numpy().astype(np.float64)
            for j, name in enumerate(patterns):
                out_blank[name][i] = None if pb is None else pb[j][:, pos].numpy().astype(np.float64)
    for note in notes:
        say(note, log, RuntimeWarning)
    if not blank:
        return out
    return out, (out_blank if isinstance(blank, dict) else out_blank["all"])


def prepare_models(predictors, device, precision: str | None = None) -> list:
    """Each predictor's model put on `device` as it predicts (the precision and layout it was validated with, or
    `precision`): their `Settings`, in order."""
    settings = [resolve_settings(p.spec, device, precision) for p in predictors]
    for p, s in zip(predictors, settings):
        prepare_model(p.model, s)
    return settings


def say(msg: str, log=None, category=UserWarning, stacklevel: int = 3):
    if log is not None:
        log(msg)
    else:
        warnings.warn(msg, category, stacklevel=stacklevel)


def image_features(predictor, df: pd.DataFrame, bs: int = 64, num_workers: int | None = None, device=None,
                   label: str = "", progress: bool = True, precision: str | None = None) -> torch.Tensor:
    """Pooled backbone features of `df`'s images (plain view) from one saved model, with the settings it predicts
    with; on `device`, as float32."""
    from ..data import inference_dl
    from ..progress import progress as shown

    s = resolve_settings(predictor.spec, device, precision)
    model = prepare_model(predictor.model, s)
    dl = inference_dl(df, predictor.spec.size, None, bs=bs, num_workers=num_workers, device=s.device)
    feats = []
    with torch.inference_mode(), s.autocast():
        for (img,) in shown(dl, total=len(dl), label=label, size=lambda b: len(b[0]), display=progress):
            feats.append(model.image_features(img.to(s.device)).float())
    return torch.cat(feats)


def model_batch(predictor, df: pd.DataFrame, device=None, precision: str | None = None):
    """One batch of `df`'s images (and metadata) as `predictor`'s model sees them, with the model set up as it
    predicts: (settings, images, meta or None). For passes that need gradients, such as Grad-CAM; run them inside
    `settings.autocast()`."""
    from ..data import inference_dl

    s = resolve_settings(predictor.spec, device, precision)
    prepare_model(predictor.model, s)
    dl = inference_dl(df, predictor.spec.size, predictor.meta_proc, bs=len(df), num_workers=0, device=s.device)
    batch = next(iter(dl))
    img = batch[0].as_subclass(torch.Tensor).to(s.device)
    return s, img, (batch[1].to(s.device) if len(batch) > 1 else None)


