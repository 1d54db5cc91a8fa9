"""Inference, one path for every prediction: device, precision, memory layout, determinism, TTA, streaming.

Out-of-fold predictions in training, `predict`, `submit`, `pseudo`, `report` (its feature and Grad-CAM passes) and
`learn.dihedral_tta` all come through here, so a change of precision, layout or TTA reaches each of them at once.
A saved model is predicted with the precision and memory layout its fold was validated with (recorded in its
config), wherever the device can run them; `precision=` overrides, and any difference is said, not hidden.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import MelafastError
from .tta import dihedral_view, dihedral_views

__all__ = ["PRECISIONS", "resolve_precision", "Settings", "resolve_settings", "inference_settings", "set_determinism",
           "record_nondeterminism", "predict_probs_multi", "predict_probs", "predict_many", "image_features", "model_batch",
           "Predictor", "RunPredictor", "load_predictor", "MissingMetadataWarning", "default_device"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MissingMetadataWarning(UserWarning):
    """Images predicted without any patient metadata, through the model's missing-metadata path."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU; checks explicit choices."""
    if precision not in PRECISIONS:
        raise MelafastError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32" and not cuda:
        raise MelafastError(f"precision {precision} needs a CUDA GPU; on the CPU use fp32 (or auto)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise MelafastError("this GPU has no bf16: use --precision fp16 (or auto)")
    return precision


def _can_run(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return True
    return device.type == "cuda" and (precision == "fp16" or torch.cuda.is_bf16_supported())


@dataclass
class Settings:
    """How one model predicts: where, in which precision and memory layout, and why if not as validated."""

    device: torch.device  # where the model runs
    precision: str  # fp32, bf16 or fp16 (autocast)
    channels_last: bool  # weights and images stored channels-last
    note: str = ""  # how these differ from what the model was validated with, and why; "" when they do not

    @property
    def amp_dtype(self):
        return _AMP.get(self.precision)

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        return f"{self.precision}{', channels-last' if self.channels_last else ''} on {self.device.type}"


def resolve_settings(config: dict, device=None, precision: str | None = None) -> Settings:
    """The settings a saved model predicts with: the precision and memory layout its config records (what training
    resolved to, and what its out-of-fold predictions were made with) where `device` can run them, else fp32;
    `precision` (auto, bf16, fp16, fp32) overrides the recorded one."""
    device = torch.device(device) if device is not None else default_device()
    validated, layout = config.get("precision"), config.get("channels_last")
    channels_last = bool(layout) if layout is not None else device.type == "cuda"
    if precision is not None:
        chosen = resolve_precision(precision, device)
        note = f"precision {chosen} as asked (validated in {validated})" if validated and chosen != validated else ""
    elif validated is None:  # saved before melafast recorded it: the rule of that time
        chosen = resolve_precision("auto", device)
        note = f"the model does not record the precision it was validated with (an older run): predicting in {chosen}"
    elif _can_run(validated, device):
        chosen, note = validated, ""
    else:
        chosen = "fp32"
        note = (f"validated in {validated}, which this {device.type} cannot run: predicting in fp32 (probabilities may "
                "differ from the out-of-fold ones in the third decimal; --precision to choose)")
    return Settings(device, chosen, channels_last, note)


def inference_settings(model, device, precision: str = "auto", channels_last: bool | None = None):
    """Put `model` on `device` in eval mode with the given precision rule and memory layout (default: channels-last
    on GPUs); return the autocast dtype (None for fp32). On GPUs cuDNN autotunes its kernels unless deterministic
    algorithms were asked for."""
    device = torch.device(device)
    settings = Settings(device, resolve_precision(precision, device),
                        device.type == "cuda" if channels_last is None else channels_last)
    _prepare(model, settings)
    return settings.amp_dtype


def _prepare(model, settings: Settings):
    "Put `model` where and how `settings` say, in eval mode."
    model.to(settings.device).eval()
    model.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    model.channels_last = settings.channels_last
    if settings.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True
    return model


def set_determinism(deterministic: bool):
    """Deterministic algorithms (and no cuDNN autotuning) or the fastest ones.

    What `deterministic=True` guarantees: on the same machine, with the same software and seed, every operation that
    has a deterministic kernel gives the same bits each run. torch has no deterministic kernel for a few GPU
    operations; those still run (they are only warned about), and `record_nondeterminism` lists them, so a run can
    say which of its numbers may move in the last digits. The CPU repeats either way.
    """
    import os

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


_NONDET = re.compile(r"^(.+?) does not have a deterministic implementation")


@contextlib.contextmanager
def record_nondeterminism():
    """Collect the operations torch ran without a deterministic kernel while deterministic algorithms were asked for;
    yields a list that fills with their names (each once), and lets every other warning through."""
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        others = []
        for w in caught:
            m = _NONDET.match(str(w.message))
            if m and torch.are_deterministic_algorithms_enabled():
                if m.group(1) not in found:
                    found.append(m.group(1))
            else:
                others.append(w)
        seen = set()
        for w in others:  # outside the recording, once each: they go where they would have gone
            key = (str(w.message), w.category, w.filename, w.lineno)
            if key not in seen:
                seen.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# --------------------------------------------------------------------------------------------------
# The loop


def predict_probs_multi(models, dl, meta_slices, n: int = 8, amp_dtype=None, n_inp: int | None = None,
                        progress: bool = True, blanks=None):
    """Class probabilities of several models over one pass of `dl` (each batch decoded once, each view made once).

    `dl` yields `(image, [meta], *targets)` with `n_inp` inputs (default `dl.n_inp`); model `i` gets
    `meta[:, meta_slices[i]]`, or the image only when `meta_slices[i]` is None. `amp_dtype` is one autocast dtype
    for all models or a list (None: fp32). Returns one (N, n_out_i) tensor per model, averaged over `n` dihedral
    views (kept on the device until the end: no sync per batch). With `blanks` (one `MetaProcessor` or None per
    model) it returns a second list too: the same models with every patient field blanked, from the same image
    features, as for a patient who comes without metadata.
    """
    from .progress import progress as shown

    views = dihedral_views(n)
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    device = next(models[0].parameters()).device
    amps = amp_dtype if isinstance(amp_dtype, (list, tuple)) else [amp_dtype] * len(models)
    blanks = blanks or [None] * len(models)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    outs, blank_outs = [[] for _ in models], [[] for _ in models]
    try:
        with torch.inference_mode():
            for batch in shown(dl, total=len(dl), label=f"TTA x{len(views)}", size=lambda b: len(b[0]),
                               display=progress):
                img, *rest = [b.to(device, non_blocking=True) for b in batch[:n_inp]]
                totals, blank_totals = [0.0] * len(models), [0.0] * len(models)
                for k in views:
                    view = dihedral_view(img, k)
                    for i, (m, sl, amp, proc) in enumerate(zip(models, meta_slices, amps, blanks)):
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            meta = None if sl is None else rest[0][:, sl]
                            feats = m.image_features(view)
                            totals[i] = totals[i] + torch.softmax(m.classify(feats, meta).float(), dim=-1)
                            if proc is not None:
                                blank = m.classify(feats, proc.blank(meta.as_subclass(torch.Tensor)))
                                blank_totals[i] = blank_totals[i] + torch.softmax(blank.float(), dim=-1)
                for i in range(len(models)):
                    outs[i].append(totals[i] / len(views))
                    if blanks[i] is not None:
                        blank_outs[i].append(blank_totals[i] / len(views))
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    probs = [torch.cat(o).cpu() if o else torch.zeros(0, 0) for o in outs]
    if not any(b is not None for b in blanks):
        return probs
    return probs, [torch.cat(o).cpu() if o else None for o in blank_outs]


def predict_probs(model, dl, n: int = 8, amp_dtype=None, n_inp: int | None = None, progress: bool = True) -> torch.Tensor:
    """Class probabilities (N, n_out) of `model` over `dl`, averaged over `n` dihedral views of each batch.

    `dl` yields `(image, [meta], *targets)`; `n_inp` counts the inputs (default `dl.n_inp`).
    """
    n_inp = n_inp or getattr(dl, "n_inp", 1)
    return predict_probs_multi([model], dl, [slice(None) if n_inp > 1 else None], n=n, amp_dtype=amp_dtype,
                               n_inp=n_inp, progress=progress)[0]


def _table_for(predictors, df: pd.DataFrame) -> pd.DataFrame:
    "The rows to predict, with the extra metadata features computed over them when a model was trained with them."
    from .data import EXTRA_CONT_NAMES, add_meta_features, check_file_features, clean_metadata

    procs = [p.meta_proc for p in predictors if p.meta_proc is not None]
    if any(c in EXTRA_CONT_NAMES and c not in df.columns for proc in procs for c in proc.cont_names):
        df = add_meta_features(df)  # the models were trained with them: compute them over this table
        for p in predictors:
            check_file_features(p.config, df)
    return clean_metadata(df)


def predict_many(predictors: list, df: pd.DataFrame, tta: int = 8, bs: int = 64, num_workers: int | None = None,
                 device=None, progress: bool = True, precision: str | None = None, log=None) -> list:
    """Melanoma probabilities of every predictor for the rows of `df` (one array each), decoding each image once
    per input size rather than once per model: the fold models of a run share one pass over the images.

    Each model runs with the precision and memory layout it was validated with (see `resolve_settings`);
    `precision` overrides them. `log` receives a line when a model cannot run as validated (default: a warning).
    """
    from .data import MetaStack, inference_dl

    df = _table_for(predictors, df)
    device = torch.device(device) if device is not None else default_device()
    out = [None] * len(predictors)
    notes = []
    for size in sorted({p.config["size"] for p in predictors}):
        idx = [i for i, p in enumerate(predictors) if p.config["size"] == size]
        stack = MetaStack([predictors[i].meta_proc for i in idx])
        dl = inference_dl(df, size, stack if stack.procs else None, bs=bs, num_workers=num_workers, device=device)
        amps = []
        for i in idx:
            s = resolve_settings(predictors[i].config, device, precision)
            _prepare(predictors[i].model, s)
            amps.append(s.amp_dtype)
            if s.note and s.note not in notes:
                notes.append(s.note)
        probs = predict_probs_multi([predictors[i].model for i in idx], dl, stack.slices, n=tta, amp_dtype=amps,
                                    progress=progress)
        for i, pr in zip(idx, probs):
            out[i] = pr[:, predictors[i].config["pos"]].numpy().astype(np.float64)
    for note in notes:
        _say(note, log, RuntimeWarning)
    return out


def _say(msg: str, log=None, category=UserWarning, stacklevel: int = 3):
    if log is not None:
        log(msg)
    else:
        warnings.warn(msg, category, stacklevel=stacklevel)


def image_features(predictor, df: pd.DataFrame, bs: int = 64, num_workers: int | None = None, device=None,
                   label: str = "", progress: bool = True, precision: str | None = None) -> torch.Tensor:
    """Pooled backbone features of `df`'s images (plain view) from one saved model, with the settings it predicts
    with; on `device`, as float32."""
    from .data import inference_dl
    from .progress import progress as shown

    s = resolve_settings(predictor.config, device, precision)
    model = _prepare(predictor.model, s)
    dl = inference_dl(df, predictor.config["size"], None, bs=bs, num_workers=num_workers, device=s.device)
    feats = []
    with torch.inference_mode(), s.autocast():
        for (img,) in shown(dl, total=len(dl), label=label, size=lambda b: len(b[0]), display=progress):
            feats.append(model.image_features(img.to(s.device)).float())
    return torch.cat(feats)


def model_batch(predictor, df: pd.DataFrame, device=None, precision: str | None = None):
    """One batch of `df`'s images (and metadata) as `predictor`'s model sees them, with the model set up as it
    predicts: (settings, images, meta or None). For passes that need gradients, such as Grad-CAM; run them inside
    `settings.autocast()`."""
    from .data import inference_dl

    s = resolve_settings(predictor.config, device, precision)
    _prepare(predictor.model, s)
    dl = inference_dl(df, predictor.config["size"], predictor.meta_proc, bs=len(df), num_workers=0, device=s.device)
    batch = next(iter(dl))
    img = batch[0].as_subclass(torch.Tensor).to(s.device)
    return s, img, (batch[1].to(s.device) if len(batch) > 1 else None)


# --------------------------------------------------------------------------------------------------
# Predictors: what `load_predictor` gives


def _no_metadata_note(predictors, df: pd.DataFrame, figures: dict) -> str | None:
    "What to tell a user whose images come without any patient metadata, or None when all have some."
    from .data import EXTRA_CONT_NAMES

    procs = [p.meta_proc for p in predictors if p.meta_proc is not None]
    if not procs or df.empty:
        return None
    # what a user gives (sex, age, site, ...), not what melafast computes from the table and the files
    fields = list(dict.fromkeys(c for p in procs for c in p.patient_columns if c not in EXTRA_CONT_NAMES))
    present = [c for c in fields if c in df.columns]
    none = df[present].isna().all(axis=1) if present else pd.Series(True, index=df.index)
    if not none.any():
        return None
    with_meta, without = figures.get("auc"), figures.get("auc_no_meta")
    scope = figures.get("scope", "out-of-fold")
    how = (f"it scored AUC {without:.4f} {scope} with every field blanked ({with_meta:.4f} with its metadata)"
           if with_meta is not None and without is not None else "its run did not record how it scores without metadata")
    dropout = figures.get("meta_dropout")
    trained = ("it was trained for it (metadata dropout {:.2f})".format(dropout) if dropout else
               "it learned that path only from the training rows that had holes (no metadata dropout)")
    return (f"{int(none.sum())} of {len(df)} images have no metadata ({', '.join(fields)}): they are predicted through "
            f"the model's missing-metadata path; {trained}; {how}")


@dataclass
class Predictor:
    """A trained melanoma model, ready to predict new images (a folder, paths, or a DataFrame with `fname`)."""

    model: torch.nn.Module  # the rebuilt MelanomaModel, in eval mode
    config: dict  # the fold's config.json

    @property
    def meta_proc(self):
        from .data import MetaProcessor

        return MetaProcessor.from_dict(self.config["meta_proc"]) if self.config["meta"] else None

    @property
    def tta(self) -> int:
        """The dihedral TTA the run scored this model with (8 for models saved before it was recorded)."""
        return int(self.config.get("tta", 8))

    @property
    def figures(self) -> dict:
        return dict(auc=self.config.get("valid_auc"), auc_no_meta=self.config.get("valid_auc_no_meta"),
                    meta_dropout=self.config.get("meta_dropout"), scope="on its validation fold")

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True, precision: str | None = None, log=None) -> np.ndarray:
        """Melanoma probability of each image, in order, averaged over `tta` dihedral views (default: the run's).

        `images`: a folder, an image path, a list of paths, or a DataFrame with `fname` (see `image_table`);
        `meta`: a CSV or DataFrame of metadata by `image_name` (images it does not cover count as unknown; when
        some have no metadata at all, `log` is told, or a `MissingMetadataWarning` raised, with how the model does
        on that path). `precision` overrides the precision the model was validated with.
        """
        return _predict([self], self.figures, images, meta, tta or self.tta, bs, num_workers, device, progress,
                        precision, log)[0]


@dataclass
class RunPredictor:
    """Every fold model of a run as one predictor: the mean of their melanoma probabilities, as `submit` blends them."""

    predictors: list  # one `Predictor` per fold model
    path: Path  # the run folder
    tta: int = 8  # the dihedral TTA the run was made with
    figures: dict | None = None  # the run's OOF AUC with and without metadata, and its metadata dropout

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True, precision: str | None = None, log=None) -> np.ndarray:
        """Melanoma probability of each image: the fold models' mean (arguments as `Predictor.predict`)."""
        preds = _predict(self.predictors, self.figures or {}, images, meta, tta or self.tta, bs, num_workers, device,
                         progress, precision, log)
        return np.mean(preds, axis=0)


def _predict(predictors, figures, images, meta, tta, bs, num_workers, device, progress, precision, log) -> list:
    from .data import image_table

    df = image_table(images, meta)
    note = _no_metadata_note(predictors, df, figures)
    if note:
        _say(note, log, MissingMetadataWarning, stacklevel=4)  # at the line that called .predict
    return predict_many(predictors, df, tta=tta, bs=bs, num_workers=num_workers, device=device, progress=progress,
                        precision=precision, log=log)


def load_predictor(path, device="cpu"):
    """Rebuild saved models from their two files each (safetensors + JSON; no pickle is ever opened).

    A fold folder gives a `Predictor`; a run folder gives a `RunPredictor` over all its fold models, which
    predicts with the run's TTA. Both have `.predict(images, meta=None)`.
    """
    from .checkpoint import load_model
    from .runfolder import RunFolder

    run = RunFolder(path)
    if run.is_single_model():  # one model's folder (a broken one says what is wrong with it)
        run.require()
        return Predictor(*load_model(run.path, device))
    if run.config_file.is_file():
        run.config()  # a run folder of a newer format stops here, naming the version
    predictors = [Predictor(*load_model(d, device)) for d in run.model_dirs()]
    results, settings = run.results(), (run.settings if run.config_file.is_file() else {})
    figures = dict(auc=results.get("oof_auc"), auc_no_meta=results.get("oof_auc_no_meta"),
                   meta_dropout=settings.get("meta_dropout"))
    return RunPredictor(predictors, run.path, run.tta, figures)

