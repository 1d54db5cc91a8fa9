"""Train one fold: seed, build the Learner, find the lr, fit, keep the epoch the rule says, predict its validation rows."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.learner import Recorder

from .averaging import unwrap
from ..config import TrainConfig
from ..progress import LineProgress

__all__ = ["seed_everything", "train_fold", "fold_learner", "find_lr", "phase_lr_find", "EpochTracker"]


class EpochTracker(Callback):
    "Log every epoch of every fit; with `keep_best`, also copy the weights of the epoch with the best validation AUC."
    order = Recorder.order + 1

    def __init__(self, keep_best: bool = False):
        self.keep_best = keep_best
        self.rows, self.best_auc, self.best_state, self.best_epoch = [], -np.inf, None, None

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        vals = dict(zip(self.recorder.metric_names[1:], self.learn.final_record))
        frozen = getattr(self.opt, "frozen_idx", 0) > 0
        auc = vals.get("melanoma_auc")
        auc = float(auc) if auc is not None else float("nan")
        epoch = len(self.rows)
        self.rows.append(dict(epoch=epoch, phase="frozen" if frozen else "unfrozen",
                              train_loss=float(vals["train_loss"]), valid_loss=float(vals["valid_loss"]),
                              melanoma_auc=auc, seconds=round(time.time() - self.t0, 2)))
        if not self.keep_best:
            return
        # an undefined AUC (one class in validation) keeps the latest weights until a real AUC appears
        better = auc > self.best_auc if not np.isnan(auc) else np.isneginf(self.best_auc)
        if better:
            self.best_auc = auc if not np.isnan(auc) else -np.inf
            self.best_epoch = epoch
            # the weights that were just validated: the moving average when there is one
            ema = getattr(self.learn, "weight_ema", None)
            state = ema.averaged_state() if ema is not None else unwrap(self.model).state_dict()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    @property
    def last_epoch(self):
        return self.rows[-1]["epoch"] if self.rows else None

    def add_validation(self, learn, phase: str, t0: float):
        "Score the model as it is now on the validation set (no TTA) and log it as one more row."
        from ..metrics import auc as _auc
        from .learner import dihedral_tta

        probs = dihedral_tta(learn, n=1, progress=False).double()
        items, vocab = learn.dls.valid_ds.items, list(learn.dls.vocab)
        labels = items["diagnosis_label"] if "diagnosis_label" in items.columns else items["target"]
        idx = torch.tensor([vocab.index(v) for v in labels])
        loss = float(torch.nn.functional.nll_loss(probs.clamp_min(1e-7).log(), idx))
        auc = _auc(items["target"].to_numpy(), probs[:, learn.metrics[0].pos].numpy())
        self.rows.append(dict(epoch=len(self.rows), phase=phase, train_loss=float("nan"), valid_loss=loss,
                              melanoma_auc=auc, seconds=round(time.time() - t0, 2)))

    def restore_best(self, model) -> bool:
        "Load the best epoch's weights into `model`; False when no epoch had a defined AUC (nothing to load)."
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True


def _fit(learn, cfg: TrainConfig, lr: float):
    "fine_tune (frozen epochs first) or one cycle, as `cfg` says; the backbone at lr / lr_mult once unfrozen."
    lr_mult = cfg.lr_mult  # backbone lr = head lr / lr_mult once unfrozen
    if cfg.freeze_epochs > 0:
        if cfg.epochs > 0:
            learn.fine_tune(cfg.epochs, base_lr=lr, freeze_epochs=cfg.freeze_epochs, lr_mult=lr_mult)
        else:
            learn.freeze()
            learn.fit_one_cycle(cfg.freeze_epochs, lr, pct_start=0.99)
    else:
        learn.unfreeze()
        learn.fit_one_cycle(cfg.epochs, slice(lr / 2 / lr_mult, lr / 2), pct_start=0.3, div=5.0)


def seed_everything(seed: int, deterministic: bool = False):
    """Seed Python, numpy and torch. GPUs then autotune their convolutions (cuDNN benchmark), which is fastest but
    not bit-for-bit repeatable; `deterministic` turns on deterministic algorithms instead (see
    `inference.set_determinism` for what that guarantees). The CPU repeats either way.
    """
    from fastai.torch_core import set_seed

    from ..inference import set_determinism

    set_seed(seed)
    set_determinism(deterministic)


def fold_learner(df, k, cfg: TrainConfig, path):
    "The seeded Learner of fold `k`: its DataLoaders and model as `cfg` says; `path` holds lr_find's checkpoint."
    from ..data import melanoma_dls, pseudo_for_fold
    from .distributed import process_device
    from .learner import melanoma_learner

    seed_everything(cfg.seed, cfg.deterministic)
    dls = melanoma_dls(pseudo_for_fold(df, k), fold=k, size=cfg.size, bs=cfg.bs, meta=cfg.meta, num_workers=cfg.workers,
                       device=process_device(), upsample=cfg.upsample, target=cfg.target, aug=cfg.aug,
                       meta_dropout=cfg.meta_dropout, dropout_patterns=cfg.dropout_patterns,
                       cat_names=cfg.cat or None, cont_names=cfg.cont or None, neg_per_pos=cfg.neg_per_pos,
                       seed=cfg.seed * 1000 + k)
    # `path`: where fastai's lr_find puts its temporary checkpoint (instead of a models/ folder in the cwd)
    return melanoma_learner(dls, cfg.arch, meta=cfg.meta, pretrained=cfg.pretrained, weights=cfg.weights,
                            precision=cfg.precision, compile=cfg.compile, frozen_bn=cfg.frozen_bn,
                            image_head=cfg.image_head, path=path, model_dir=".",
                            model_kwargs=dict(color_constancy=cfg.color_constancy) if cfg.color_constancy else None)


def phase_lr_find(learn, on: str, suggest_funcs):
    "fastai's lr_find on the frozen model (what fine_tune's first phase trains) or the unfrozen one; plots it."
    learn.freeze() if on == "frozen" else learn.unfreeze()
    return learn.lr_find(suggest_funcs=suggest_funcs, show_plot=True)


def find_lr(learn, png, on: str = "frozen") -> float:
    "lr_find's valley on the frozen or unfrozen model; the plot saved to `png`."
    from fastai.callback.schedule import slide, valley

    from ..evaluate.plots import save_current_figure

    sugg = phase_lr_find(learn, on, (valley, slide))
    save_current_figure(png)
    return float(sugg.valley)


def train_fold(df, k, cfg: TrainConfig, run_dir: Path, log: Callable, clock=None):
    """Train fold `k`; return its OOF rows (`pred`: the last epoch's, the honest CV; `pred_selected` with keep="best":
    the saved model's, chosen on these rows; `pred_no_meta`: the saved model's with every patient field blanked, for
    a model with metadata), its metric rows, the epoch it kept,
    and the operations that ran without a deterministic kernel although `cfg.deterministic` asked for one. `clock`
    (a `progress.RunClock`): where the run stands, for the progress lines."""
    from .save import save_model
    from ..processes import is_main
    from ..inference import record_nondeterminism
    from ..runfolder import RunFolder

    run = RunFolder(run_dir)
    fold_dir = run.fold_dir(k)
    fold_dir.mkdir(parents=True, exist_ok=True)
    # with --deterministic, the operations torch had no deterministic kernel for (other warnings pass untouched)
    with (record_nondeterminism() if cfg.deterministic else contextlib.nullcontext([])) as nondeterministic:
        learn = fold_learner(df, k, cfg, fold_dir)
        if clock is not None and isinstance(getattr(learn, "progress", None), LineProgress):
            learn.progress.clock = clock  # a log, not a screen: each epoch's line says the fold and the run's ETA
        result = _fit_fold(learn, df, k, cfg, run, log, clock)
    if is_main():
        save_model(learn, fold_dir, extra=dict(result.pop("extra"), nondeterministic_ops=nondeterministic))
    return result["oof"], result["metrics"], result["kept"], nondeterministic


def _fit_fold(learn, df, k, cfg: TrainConfig, run, log, clock=None) -> dict:
    "Find the lr, fit, keep the model the rule says and predict the validation rows with it."
    from .averaging import WeightEMA, WeightSWA
    from .distributed import to_distributed
    from ..processes import world_size
    from ..metrics import auc

    lr = cfg.lr if cfg.lr is not None else find_lr(learn, run.lr_find_file(k), cfg.lr_find_on)
    if world_size() > 1:
        to_distributed(learn)
    where = "" if clock is None else (f" ({clock.position} of the run's {len(clock.folds)} folds"
                                      + (f"; {clock.eta()}" if clock.eta() else "") + ")")
    log(f"fold {k}: {len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} valid images, lr {lr:.2e}{where}")
    tracker = EpochTracker(keep_best=cfg.keep == "best")
    ema = WeightEMA(cfg.ema) if cfg.ema is not None else None
    swa = WeightSWA(cfg.swa) if cfg.swa else None
    cbs = [tracker, *([ema] if ema else []), *([swa] if swa else [])]
    learn.add_cbs(cbs)
    try:
        _fit(learn, cfg, lr)
    finally:
        learn.remove_cbs(cbs)
    kept = tracker.last_epoch
    if swa is not None:  # the average of the last epochs is the model, whatever epoch scored best
        t0 = time.time()
        swa.apply(learn)
        tracker.add_validation(learn, "swa", t0)
        kept = "swa"
    elif ema is not None:  # validation scored the moving average: that is the model
        unwrap(learn.model).load_state_dict(ema.averaged_state())
    valid = learn.dls.valid_ds.items
    pred, no_meta = _valid_preds(learn, cfg.tta)
    oof = pd.DataFrame({"image_name": valid["image_name"].to_numpy(), "target": valid["target"].to_numpy(), "fold": k,
                        "pred": pred})
    saved = pred  # the predictions of the model that is saved
    if cfg.keep == "best" and swa is None:
        # the epoch with the best `melanoma_auc`, the joint head's (the image head's, for rows without metadata), is
        # the model saved: its predictions, with and without metadata, are what the run records of it; `pred` stays
        # the last epoch's, the honest CV
        if tracker.restore_best(unwrap(learn.model)):
            kept = tracker.best_epoch
        saved, no_meta = _valid_preds(learn, cfg.tta)
        oof["pred_selected"] = saved
    if no_meta is not None:
        oof["pred_no_meta"] = no_meta
    extra = dict(fold=k, lr=lr, kept_epoch=kept, keep=cfg.keep, seed=cfg.seed, ema=cfg.ema, swa=cfg.swa, tta=cfg.tta,
                 meta_dropout=getattr(learn.dls, "meta_dropout", 0.0), dropout_patterns=cfg.dropout_patterns,
                 valid_auc=auc(oof["target"], saved),
                 valid_auc_no_meta=auc(oof["target"], no_meta) if no_meta is not None else None)
    if cfg.meta and cfg.extra_meta:  # what the file features were computed on, to recognise other files later
        from ..data import file_reference

        extra["files"] = file_reference(df[df["fold"] != k])
    return dict(oof=oof, metrics=pd.DataFrame(tracker.rows).assign(fold=k), kept=kept, extra=extra)


def _valid_preds(learn, tta: int):
    """Melanoma probabilities of the validation rows with `tta` dihedral views, and for a model with metadata the
    same with every patient field blanked (None for an image-only model), from one pass over the images."""
    from ..inference import predict_probs_multi
    from .learner import melanoma_probs
    from .learner import amp_dtype

    meta, pos = learn.dls.n_inp > 1, learn.metrics[0].pos
    out = predict_probs_multi([unwrap(learn.model)], learn.dls.valid, [slice(None) if meta else None], n=tta,
                              amp_dtype=amp_dtype(learn), n_inp=learn.dls.n_inp,
                              blanks=[learn.dls.meta_proc] if meta else None)
    if not meta:
        return melanoma_probs(out[0], pos), None
    probs, blank = out
    return melanoma_probs(probs[0], pos), melanoma_probs(blank[0], pos)
