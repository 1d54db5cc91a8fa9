"""Pseudo-labels: a trained run's confident test predictions become soft-labelled training rows for the next run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, MelafastError

__all__ = ["pseudo_labels", "select_pseudo"]


def select_pseudo(pred, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """Mask of the confident predictions: melanoma probability <= `low` or >= `high` (`low == high` keeps all)."""
    if not 0 <= low <= high <= 1:
        raise MelafastError(f"need 0 <= --low <= --high <= 1, got low={low}, high={high}")
    pred = np.asarray(pred, dtype=np.float64)
    return (pred <= low) | (pred >= high)


def pseudo_labels(run, data=None, out=None, low: float = 0.1, high: float = 0.9, hard: bool = False, tta: int | None = None,
                  bs: int = 64, num_workers: int | None = None, images=None, log: Callable = print,
                  precision: str | None = None) -> pd.DataFrame:
    """Predict the test set with every fold model of `run` (TTA default: the run's) and keep the confident images as
    pseudo-labels, fold by fold.

    Writes `out` (default the run's pseudo.csv) with, per image, the ensemble's prediction `pred` and soft target
    `soft_target`, and each fold model's own `pred_fold<k>` and `soft_target_fold<k>` (empty where that model is
    not confident); a JSON beside it naming the run and its folds; and a histogram. `soft_target` is the predicted
    probability itself (or 0/1 with `hard=True`). Train on them with `melafast train --pseudo <csv>` (library:
    `TrainConfig(pseudo=...)`) on the same data, folds and seed: the student's fold k then trains only on the
    labels of the teacher's fold-k model, which never saw fold k's labels, so its CV stays honest. An image is
    written when the ensemble or any fold model is confident about it. Test images that cannot be read are left out.
    """
    from ..atomic import write_csv
    from ..data import check_images, load_split
    from ..inference import load_predictor, predict_many
    from ..evaluate.plots import plot_pseudo
    from ..runfolder import RunFolder
    from ..inference.tta import dihedral_views

    select_pseudo([], low, high)  # check the thresholds before any prediction
    if tta is not None:
        dihedral_views(tta)
    folder = RunFolder(run)
    folder.model_dirs()
    data = folder.data_for(data)
    test = load_split(data, "test", images=images)  # the training images need not be there
    if test is None or test.empty:
        raise DataError(f"{data} has no test.csv: pseudo-labels are made from test images")
    test, bad = check_images(test.reset_index(drop=True), "skip")
    if len(bad):
        log(f"{len(bad)} unreadable test image(s) left out: " + "; ".join(bad["image_name"].head(3)))
    if test.empty:
        raise DataError(f"none of the test images in {data} can be read: nothing to pseudo-label")
    predictor = load_predictor(folder.path)
    models = getattr(predictor, "predictors", [predictor])
    folds = [m.spec.fold for m in models]
    if None in folds or len(set(folds)) != len(folds):
        raise MelafastError(f"{run} is not a run of fold models (its models do not name distinct folds): pseudo-labels "
                            "are made fold by fold")
    log(f"predicting {len(test)} test images with the {len(models)} fold model(s) of {run} (TTA x{tta or predictor.tta})")
    per_fold = predict_many(models, test, tta=tta or predictor.tta, bs=bs, num_workers=num_workers,
                            precision=precision, log=log)
    pred = np.mean(per_fold, axis=0)
    keep = select_pseudo(pred, low, high)
    out = Path(out) if out is not None else folder.pseudo_file
    plot_pseudo(pred, keep, low, high, out.with_suffix(".png"))
    fold_keep = [select_pseudo(p, low, high) for p in per_fold]
    written = keep | np.any(fold_keep, axis=0)
    if not written.any():
        q = np.quantile(pred, [0, 0.05, 0.5, 0.95, 1]).round(3).tolist()
        raise DataError(f"no test image is predicted <= {low} or >= {high} (min, 5%, median, 95%, max: {q}; histogram "
                        f"in {out.with_suffix('.png')}): widen --low/--high, or train a stronger run first")

    def soft(p, kept):
        return np.where(kept, (p >= 0.5).astype(float) if hard else p, np.nan)

    table = pd.DataFrame({"image_name": test["image_name"].to_numpy(), "pred": pred, "soft_target": soft(pred, keep)})
    for k, p, kept in zip(folds, per_fold, fold_keep):
        table[f"pred_fold{k}"], table[f"soft_target_fold{k}"] = p, soft(p, kept)
    table = table[written]
    write_csv(table, out)
    settings = folder.train_config() if folder.config_file.is_file() else None
    oof = folder.oof(need="pseudo-labels record the teacher's folds")
    folder.write_pseudo_info(out, dict(run=str(folder.path.resolve()), folds=settings.folds if settings else None,
                                       seed=settings.seed if settings else None, low=low, high=high, hard=hard,
                                       fold_of={str(n): int(f) for n, f in zip(oof["image_name"], oof["fold"])}))
    n_pos = int((pred[keep] >= high).sum())
    per = ", ".join(f"fold {k}: {int(kept.sum())}" for k, kept in zip(folds, fold_keep))
    log(f"kept {int(keep.sum())} of {len(test)} test images by the ensemble (<= {low}: {int(keep.sum()) - n_pos}, "
        f">= {high}: {n_pos}); by each fold model: {per}; {'hard' if hard else 'soft'} labels; wrote {out}, "
        f"{RunFolder.pseudo_info_file(out)} and {out.with_suffix('.png')}")
    log(f"next: melafast train --pseudo {out} with the same data, --folds and --seed: fold k trains on the labels of "
        "the teacher's fold-k model only, so the CV stays honest")
    return table
