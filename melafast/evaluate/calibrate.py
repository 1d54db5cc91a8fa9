"""`melafast calibrate`: an operating point chosen on labelled patients the run never saw, on `predict`'s own scale
(the fold mean), its figures cross-fitted on patient-grouped parts of the calibration set."""

from __future__ import annotations

import datetime

import numpy as np
import pandas as pd

from ..errors import MelafastError
from ..record import figure_in_words
from .external import trained_on
from .operating import ENSEMBLE_RULE, by_measure, check_replace, operating_table, parse_goal, path_figures

__all__ = ["calibrate_operating_point", "MIN_CALIBRATION_MELANOMAS"]

MIN_CALIBRATION_MELANOMAS = 10  # fewer cannot place a sensitivity threshold


def calibrate_operating_point(run, spec, data=None, images=None, table: pd.DataFrame | None = None,
                              prevalence: float | None = None, n_boot: int = 1000, per_model=None, bs: int = 64,
                              num_workers: int | None = None, progress: bool = True, folds: int = 5, log=print,
                              replace: bool = False) -> dict:
    """Choose the operating point `spec` on a calibration set, on `predict`'s own scale, and save it in `run`.

    The calibration set is labelled images of patients the run never trained on: `data` (a folder with a
    train.csv-style table of image_name, target and metadata; `images` where its images are) or `table` (a
    DataFrame as `load_competition` returns). Every fold model scores it as `predict` does (the run's TTA, each
    model's validated precision) and the threshold is chosen on the fold mean; `predict`'s decision is then the
    fold mean at or above it (`ENSEMBLE_RULE`). Its sensitivity, specificity, PPV and NPV are cross-fitted on
    `folds` patient-grouped folds of the calibration set (each part judged by a threshold chosen on the others),
    with patient-bootstrap intervals; the threshold saved is the one chosen on all of it. `per_model`: the fold
    models' probabilities of `table`'s rows when already computed. Returns what was written to threshold.json."""
    from ..data import load_competition, make_folds
    from ..inference import load_predictor
    from ..runfolder import RunFolder

    folder = RunFolder(run)
    goal = parse_goal(spec)
    if goal["kind"] == "value":
        raise MelafastError(f"a fixed threshold ({goal['threshold']}) needs no calibration set: save it with "
                            f"`melafast report --run {folder.path} --operating-point {goal['threshold']}`")
    check_replace(folder, replace)  # a calibrated point there stops it before any image is scored
    if table is None:
        if data is None:
            raise MelafastError("a calibration set is needed: --data FOLDER (a train.csv of labelled images)")
        table, _ = load_competition(data, images)
    if "target" not in table.columns:
        raise MelafastError("the calibration set needs a target column (1: melanoma, 0: benign)")
    table = table.reset_index(drop=True)
    seen = trained_on(folder, table, log)  # by name, by patient, and by content (near-duplicate pixels)
    named = seen[~seen["by_pixels"]]
    if len(named):  # the wrong set: the run's own images or patients
        raise MelafastError(f"{len(named)} calibration images are in the run's training data (e.g. "
                            f"{named['image_name'].iloc[0]}: {named['reason'].iloc[0]}): calibrate on patients the "
                            "run never saw")
    if len(seen):  # copies under other names: left out, said
        log(f"warning: {len(seen)} calibration images nearly duplicate training images by their pixels (e.g. "
            f"{seen['image_name'].iloc[0]}: {seen['reason'].iloc[0]}): left out of the calibration set")
        if per_model is not None:
            keep = ~table["image_name"].isin(seen["image_name"]).to_numpy()
            per_model = np.asarray(per_model)[:, keep]
        table = table[~table["image_name"].isin(seen["image_name"])].reset_index(drop=True)
    target = table["target"].to_numpy().astype(int)
    n_mel = int(target.sum())
    if n_mel < MIN_CALIBRATION_MELANOMAS or n_mel == len(target):
        raise MelafastError(f"the calibration set holds {n_mel} melanomas in {len(target)} images: it needs at least "
                            f"{MIN_CALIBRATION_MELANOMAS} melanomas and some benign lesions to place a threshold")
    predictor = load_predictor(folder.path)
    blanked = None
    if per_model is None:
        from ..inference.loop import predict_many

        log(f"scoring {len(table)} calibration images with {len(predictor.predictors)} fold models, TTA "
            f"x{predictor.tta}, with their metadata and with every field blanked (the same pass)")
        per_model, blank = predict_many(predictor.predictors, table, tta=predictor.tta, bs=bs, num_workers=num_workers,
                                        progress=progress, blank=True)
        if all(b is not None for b in blank):  # a run with metadata: both paths, as predict takes them
            blanked = np.mean(np.asarray(blank, dtype=np.float64), axis=0)
    per_model = np.asarray(per_model, dtype=np.float64)
    check_replace(folder, replace, log)
    if per_model.shape != (len(predictor.predictors), len(table)):
        raise ValueError(f"per_model must hold one row of {len(table)} probabilities per fold model "
                         f"({len(predictor.predictors)}), got shape {per_model.shape}")
    mean = per_model.mean(axis=0)
    parts = make_folds(table.assign(target=target), n_folds=folds, seed=0)["fold"].to_numpy()
    groups = table["patient_id"] if "patient_id" in table.columns else None
    rows = operating_table(target, mean, parts, groups, [goal["name"]], prevalence, n_boot)
    paths = path_figures(target, mean, blanked, parts, goal, groups, prevalence, n_boot)
    point = dict(operating_point=goal["name"], goal=goal["label"], threshold=float(rows["threshold"].iloc[0]),
                 scale="ensemble", rule=ENSEMBLE_RULE,
                 chosen_on=f"a calibration set of {len(table)} images ({n_mel} melanomas) of patients the run never "
                 f"trained on, scored as predict scores them (the mean of {len(predictor.predictors)} fold models, "
                 f"TTA x{predictor.tta})",
                 tta=predictor.tta, n_models=len(predictor.predictors), prevalence=prevalence,
                 crossfit=by_measure(rows.to_dict("records"), lambda r: None if r["cross-fitted"] is None else
                                      dict(value=r["cross-fitted"], lo=r["lo"], hi=r["hi"])),
                 in_sample=by_measure(rows.to_dict("records"), lambda r: r["in-sample (optimistic)"]),
                 fold_thresholds=rows["fold thresholds"].iloc[0] or None,
                 calibration=dict(source=str(data) if data is not None else "a table", images=len(table),
                                  melanomas=n_mel, folds=folds,
                                  patients=int(groups.nunique()) if groups is not None else len(table)),
                 meta=folder.train_config().meta if folder.config_file.is_file() else None, paths=paths,
                 saved=datetime.datetime.now().isoformat(timespec="seconds"))
    point = folder.write_operating_point(point)
    cf = point.crossfit
    log(f"operating point {goal['name']} ({goal['label']}) on the fold mean: threshold {point.threshold:.4f}; "
        f"cross-fitted on the calibration set: sensitivity {figure_in_words(cf['sensitivity'])}, specificity "
        f"{figure_in_words(cf['specificity'])}; "
        f"saved in {folder.operating_point_file}")
    return point
