"""Pseudo-labels: a trained run's confident test predictions become soft-labelled training rows for the next run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import DataError, MelafastError

__all__ = ["pseudo_labels", "select_pseudo"]


def select_pseudo(pred, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """Mask of the confident predictions: melanoma probability <= `low` or >= `high` (`low == high` keeps all)."""
    if not 0 <= low <= high <= 1:
        raise MelafastError(f"need 0 <= --low <= --high <= 1, got low={low}, high={high}")
    pred = np.asarray(pred, dtype=np.float64)
    return (pred <= low) | (pred >= high)


def pseudo_labels(run, data=None, out=None, low: float = 0.1, high: float = 0.9, hard: bool = False, tta: int | None = None,
                  bs: int = 64, num_workers: int | None = None, images=None, log: Callable = print) -> pd.DataFrame:
    """Predict the test set with every fold of `run` (TTA default: the run's) and keep the confident images as
    pseudo-labels.

    Writes `out` (default `<run>/pseudo.csv`: image_name, pred, soft_target) and a histogram next to it.
    `soft_target` is the predicted probability itself (or 0/1 with `hard=True`). Train on them with
    `melafast train --pseudo <run>/pseudo.csv` (library: `TrainConfig(pseudo=...)`): they join the training
    folds only. Test images that cannot be read are left out.
    """
    from .checkpoint import write_csv
    from .data import check_images, load_split
    from .plots import plot_pseudo
    from .submit import data_for_run, model_dirs, predict_run
    from .tta import dihedral_views

    select_pseudo([], low, high)  # check the thresholds before any prediction
    if tta is not None:
        dihedral_views(tta)
    model_dirs(run)
    data = data_for_run(run, data)
    test = load_split(data, "test", images=images)  # the training images need not be there
    if test is None or test.empty:
        raise DataError(f"{data} has no test.csv: pseudo-labels are made from test images")
    test, bad = check_images(test.reset_index(drop=True), "skip")
    if len(bad):
        log(f"{len(bad)} unreadable test image(s) left out: " + "; ".join(bad["image_name"].head(3)))
    if test.empty:
        raise DataError(f"none of the test images in {data} can be read: nothing to pseudo-label")
    pred = predict_run(run, test, tta=tta, bs=bs, num_workers=num_workers, log=log)
    keep = select_pseudo(pred, low, high)
    out = Path(out) if out is not None else Path(run) / "pseudo.csv"
    plot_pseudo(pred, keep, low, high, out.with_suffix(".png"))
    if not keep.any():
        q = np.quantile(pred, [0, 0.05, 0.5, 0.95, 1]).round(3).tolist()
        raise DataError(f"no test image is predicted <= {low} or >= {high} (min, 5%, median, 95%, max: {q}; histogram "
                        f"in {out.with_suffix('.png')}): widen --low/--high, or train a stronger run first")
    table = pd.DataFrame({"image_name": test["image_name"].to_numpy(), "pred": pred})[keep]
    table["soft_target"] = (table["pred"] >= 0.5).astype(float) if hard else table["pred"]
    write_csv(table, out)
    n_pos = int((table["pred"] >= high).sum())
    log(f"kept {len(table)} of {len(test)} test images (<= {low}: {len(table) - n_pos}, >= {high}: {n_pos}), "
        f"{'hard' if hard else 'soft'} labels; wrote {out} and {out.with_suffix('.png')}")
    log(f"next: melafast train --pseudo {out} ... (the pseudo rows train only; the CV score uses labelled images. "
        "It reads slightly high: the pseudo-labels come from models that saw every training fold)")
    return table
