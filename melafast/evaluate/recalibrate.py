"""`melafast recalibrate`: probabilities that mean what they say. A monotone map of predict's probability (Platt's
method: a temperature and a shift on the logit), fitted on the run's out-of-fold rows or on a calibration set of
patients the run never saw, with its effect on the expected calibration error measured cross-fitted (each part of
the rows judged by a map fitted on the others). Saved as recalibration.json; every surface (predict, the library,
serve, the ONNX runtime) then adds `pred_calibrated`, and probabilities at another prevalence start from it."""

from __future__ import annotations

import datetime
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import MelafastError
from ..metrics import logit

__all__ = ["fit_recalibration", "crossfit_recalibration", "recalibrate_run", "recalibration_table",
           "MIN_RECALIBRATION_MELANOMAS"]

MIN_RECALIBRATION_MELANOMAS = 10


def fit_recalibration(target, pred) -> tuple[float, float]:
    """(slope, shift) of p' = sigmoid(slope * logit(p) + shift), by maximum likelihood (an unpenalised logistic
    regression of the target on the logit). An error when the scores rank backwards (slope <= 0)."""
    from sklearn.linear_model import LogisticRegression

    target = np.asarray(target).astype(int)
    m = LogisticRegression(C=1e6, max_iter=1000).fit(logit(pred).reshape(-1, 1), target)
    slope, shift = float(m.coef_[0, 0]), float(m.intercept_[0])
    if slope <= 0:
        raise MelafastError("these scores do not rank melanomas above benign lesions (fitted slope "
                            f"{slope:.3f}): there is nothing to recalibrate")
    return slope, shift


def crossfit_recalibration(target, pred, parts) -> np.ndarray:
    "Each part's probabilities recalibrated by a map fitted on the other parts only."
    from ..record import Recalibration

    target, pred, parts = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64), np.asarray(parts)
    out = np.empty(len(pred))
    for k in np.unique(parts):
        mine = parts == k
        slope, shift = fit_recalibration(target[~mine], pred[~mine])
        out[mine] = Recalibration(slope, shift).apply(pred[mine])
    return out


def recalibrate_run(run, data=None, images=None, folds: int = 5, bs: int = 64, num_workers: int | None = None,
                    progress: bool = True, log: Callable = print):
    """Fit the run's recalibration and save it in recalibration.json; returns the `Recalibration`.

    Without `data`: on the run's out-of-fold rows (each scored by one fold model; predict averages the fold models,
    which pulls probabilities toward the middle, so a fit there is close but not exact), cross-fitted by the run's
    folds. With `data` (and `images`): on labelled images of patients the run never trained on, scored as predict
    scores them (the fold mean), cross-fitted on `folds` patient-grouped parts of them: exact for predict's scale."""
    from ..metrics import calibration
    from ..record import Recalibration
    from ..runfolder import RunFolder
    from .runview import read_run

    folder = RunFolder(run)
    if data is None:
        _, oof = read_run(folder, "a recalibration")
        if oof["fold"].nunique() < 2:
            raise MelafastError(f"{folder.path} has out-of-fold rows of one fold only: nothing to cross-fit on; pass "
                                "--data with a calibration set")
        target, pred, parts = oof["target"].to_numpy(), oof["pred"].to_numpy(), oof["fold"].to_numpy()
        fitted_on = (f"the run's {len(oof)} out-of-fold images ({int(target.sum())} melanomas), each scored by the "
                     "fold model that did not train on it")
        source = "oof"
    else:
        from ..data import make_folds
        from .external import read_labelled, score_rows, trained_on

        table, where = read_labelled(data, images)
        seen = trained_on(folder, table, log)
        if len(seen):
            log(f"warning: {len(seen)} images are in the run's training data (e.g. {seen['image_name'].iloc[0]}: "
                f"{seen['reason'].iloc[0]}): left out")
            table = table[~table["image_name"].isin(seen["image_name"])].reset_index(drop=True)
        scores = score_rows(folder, table, None, bs, num_workers, None, None, progress, log)
        target, pred = scores["target"].to_numpy(), scores["pred"].to_numpy()
        parts = make_folds(table, n_folds=folds, seed=0)["fold"].to_numpy()
        fitted_on = (f"a calibration set of {len(table)} images ({int(target.sum())} melanomas) of patients the run "
                     f"never trained on ({where}), scored as predict scores them")
        source = "calibration set"
    n_mel = int(np.sum(target))
    if n_mel < MIN_RECALIBRATION_MELANOMAS or n_mel == len(target):
        raise MelafastError(f"{n_mel} melanomas in {len(target)} images: a recalibration needs at least "
                            f"{MIN_RECALIBRATION_MELANOMAS} melanomas and some benign lesions")
    crossfit = crossfit_recalibration(target, pred, parts)
    before, after = calibration(target, pred), calibration(target, crossfit)
    slope, shift = fit_recalibration(target, pred)
    recal = Recalibration(slope=slope, shift=shift, fitted_on=fitted_on, images=len(target), melanomas=n_mel,
                          prevalence=float(np.mean(target)), ece_before=before["ece"], ece_after=after["ece"],
                          brier_before=before["brier"], brier_after=after["brier"], source=source,
                          created=datetime.datetime.now().isoformat(timespec="seconds"))
    folder.write_recalibration(recal)
    log(f"recalibration on {fitted_on}: p' = sigmoid({slope:.3f} * logit(p) {shift:+.3f}); cross-fitted there, "
        f"expected calibration error {before['ece']:.4f} -> {after['ece']:.4f}, Brier {before['brier']:.4f} -> "
        f"{after['brier']:.4f}; saved in {folder.recalibration_file}: predict adds pred_calibrated (rankings and "
        "decisions unchanged)")
    return recal


def recalibration_table(recal) -> pd.DataFrame:
    "The recalibration's figures as a small table (for the pages)."
    return pd.DataFrame([dict(figure="expected calibration error", before=recal.ece_before, after=recal.ece_after),
                         dict(figure="Brier score", before=recal.brier_before, after=recal.brier_after)])
