"""Predict with a trained run: a dataset split, or a folder of new images; every fold model, one pass over the images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, MelafastError
from ..record import figure_in_words
from ..runfolder import RunFolder
from .tta import dihedral_views

__all__ = ["predict_run", "predict_split", "predict_images", "predict_usable"]


def predict_run(run, df: pd.DataFrame, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, log: Callable = print, precision: str | None = None) -> np.ndarray:
    """Melanoma probabilities for the rows of `df`: the mean over every fold model of `run` (`tta` default: the run's),
    each in the precision and memory layout it was validated with unless `precision` says otherwise.

    The fold models share one pass over the images (each image is decoded once, not once per fold). `log` is told
    when some images come without any metadata, and how the run does on that path.
    """
    return np.mean(model_preds(run, df, tta, bs, num_workers, device, log, precision)[1], axis=0)


def model_preds(run, df, tta, bs, num_workers, device, log, precision) -> tuple:
    "(the run's predictor, one probability array per fold model) for the rows of `df`."
    from .predictor import load_predictor, predict_rows

    predictor = load_predictor(run)
    models = getattr(predictor, "predictors", [predictor])
    unfinished = RunFolder(run).unfinished_folds()
    if unfinished:
        log(f"{run} did not finish fold(s) {', '.join(map(str, unfinished))}: predicting with the {len(models)} fold "
            f"model(s) it saved (`melafast train --resume {run}` trains the others)")
    log(f"predicting {len(df)} images with the {len(models)} model(s) of {run} (TTA x{tta or predictor.tta})")
    figures = getattr(predictor, "figures", None) or {}
    return predictor, predict_rows(models, figures, df, None, tta or predictor.tta, bs, num_workers, device, True,
                               precision, log)


def training_prevalence(run) -> float:
    "The share of melanomas `run` (or the run a fold folder belongs to) learnt from; an error when not recorded."
    for folder in (RunFolder(run), RunFolder(Path(run).parent)):
        if folder.config_file.is_file():
            share = folder.info().training_prevalence
            if share is not None:
                return share
    raise MelafastError(f"{run} does not record how many melanomas it trained on: its probabilities cannot be moved "
                        "to another prevalence")


def check_prevalence(run, prevalence) -> None:
    "Before any image is scored: a prevalence in (0, 1), and a run that recorded the share it learnt from."
    if prevalence is None:
        return
    if not 0 < prevalence < 1:
        raise MelafastError(f"--prevalence must be between 0 and 1 (a share of melanomas, e.g. 0.02), got {prevalence}")
    training_prevalence(run)


def _spread(preds, ok, prevalence, run, log) -> dict:
    """pred_min and pred_max (the fold models' range), pred_calibrated when the run has a recalibration and, with
    `prevalence`, pred_at_prevalence (see `probability_columns`)."""
    cols = {}
    if len(preds) > 1:
        cols = {"pred_min": fill_unusable(np.min(preds, axis=0), ok), "pred_max": fill_unusable(np.max(preds, axis=0), ok)}
    from .probability import probability_columns

    recal = RunFolder(run).recalibration()
    trained = training_prevalence(run) if prevalence is not None else None
    extra = probability_columns(np.mean(preds, axis=0), recal, trained, prevalence)
    cols.update({k: fill_unusable(v, ok) for k, v in extra.items()})
    if recal is not None:
        effect = ("" if recal.ece_before is None or recal.ece_after is None else
                  f"; expected calibration error {recal.ece_before:.3f} -> {recal.ece_after:.3f} there, cross-fitted")
        log(f"pred_calibrated: pred recalibrated ({recal.fitted_on or 'recalibration.json'}{effect}); rankings and "
            "decisions are those of `pred`")
    if prevalence is not None:
        log(f"pred_at_prevalence: the probability where {prevalence:.1%} of lesions are melanomas (moved from "
            + (f"the recalibrated probability, fitted at {recal.prevalence:.1%}" if recal is not None else
               f"the share the models learnt from, {trained:.1%}") + "); `pred` stays as it is, and decisions use it")
    return cols


def _decisions(run, df, ok, tta, bs, num_workers, log, precision, prevalence=None) -> tuple[np.ndarray, dict]:
    """The fold mean of one run on the usable rows (the others get its median), its fold models' range and, with
    `prevalence`, the probability at that prevalence; and, when the run has a saved operating point, its `decision`
    column and, when the decision is the fold models' vote, `votes` (empty for unusable rows). Under a point chosen on
    the fold mean (`calibrate`) the reason is `pred` itself: no votes."""
    predictor, preds = model_preds(run, df[ok], tta, bs, num_workers, None, log, precision)
    pred = fill_unusable(np.mean(preds, axis=0), ok)
    spread = _spread(preds, ok, prevalence, run, log)
    point = getattr(predictor, "operating_point", None)
    if point is None:
        return pred, spread
    decision, votes = predictor.decide(preds, tta=tta, precision=precision, log=log)
    cols = {"decision": (decision, "decision")} | ({} if point.scale == "ensemble" else {"votes": (votes, "votes")})
    for name, (values, _) in list(cols.items()):
        col = pd.array(np.zeros(len(df), dtype=np.int64), dtype="Int64")
        col[ok], col[~ok] = values, pd.NA
        cols[name] = col
    cf = point.crossfit
    where = ("each part of the calibration set judged by a threshold chosen on the others" if point.scale == "ensemble"
             else "each fold judged by a threshold chosen on the other folds")
    how = ("it was not cross-fitted (one fold)" if cf.get("sensitivity") is None else
           f"chosen on {point.chosen_on}; cross-fitted there ({where}) it reached sensitivity "
           f"{figure_in_words(cf['sensitivity'])} and specificity {figure_in_words(cf['specificity'])}")
    log(f"decision (1: melanoma) at the run's operating point {point.operating_point} ({point.goal}, threshold "
        f"{point.threshold:.4f}): {int(decision.sum())} of {int(ok.sum())} images called melanoma; {point.rule}; "
        f"{how}")
    if both := point.paths_in_words():
        log(both)
    return pred, {**spread, **cols}


def usable_rows(df: pd.DataFrame, on_bad_image: str, log: Callable) -> np.ndarray:
    "Boolean mask of the rows whose image can be read; with `skip`, the others are reported, else an error."
    from ..data import check_images

    good, bad = check_images(df, on_bad_image)
    if len(bad):
        log(f"{len(bad)} unusable image(s) get the median prediction: "
            + "; ".join(f"{r.image_name} ({r.problem})" for r in bad.head(5).itertuples()))
    return df.index.isin(good.index)


def predict_usable(runs, df, ok, tta, bs, num_workers, blend_method, log, weights=None, precision=None) -> np.ndarray:
    "Blend of every run's prediction on the usable rows; unusable rows get the median of those predictions."
    from .blend import blend

    good = df[ok]
    preds = [predict_run(r, good, tta=tta, bs=bs, num_workers=num_workers, log=log, precision=precision) for r in runs]
    return fill_unusable(blend(preds, blend_method, weights) if len(preds) > 1 else preds[0], ok)


def fill_unusable(values, ok) -> np.ndarray:
    "One prediction per row from those of the usable rows (`ok`): the unusable ones get their median (0.5 if none)."
    out = np.empty(len(ok))
    out[ok] = values
    if not ok.all():
        out[~ok] = np.median(out[ok]) if ok.any() else 0.5
    return out


def _write_preds(df: pd.DataFrame, pred, ok, run, out, decisions: dict | None = None) -> pd.DataFrame:
    """image_name, pred (the melanoma probability), run [, pred_min, pred_max] [, pred_at_prevalence]
    [, decision[, votes]] [, target] [, image_ok], written atomically to `out`."""
    from ..atomic import write_csv

    res = pd.DataFrame({"image_name": df["image_name"].to_numpy(), "pred": pred, "run": str(run), **(decisions or {})})
    if "target" in df.columns:
        res["target"] = df["target"].to_numpy()
    if not ok.all():
        res["image_ok"] = ok
    write_csv(res, out)
    return res


def predict_split(run, data=None, split: str = "test", tta: int | None = None, out="preds.csv", bs: int = 64,
                  num_workers: int | None = None, images=None, on_bad_image: str = "error",
                  log: Callable = print, precision: str | None = None, prevalence: float | None = None) -> Path:
    """Predict `split` (test or train) of a dataset with every fold model of `run`; write image_name, pred, run
    (+ target). `tta` defaults to the run's. Only that split's CSV and images need to exist.

    On the train split every model has seen most images: the honest cross-validated scores are the run's out-of-fold
    predictions.
    """
    from ..data import load_split

    if split not in ("test", "train"):
        raise MelafastError(f"--split must be test or train, got {split!r}")
    if tta is not None:
        dihedral_views(tta)
    check_prevalence(run, prevalence)
    folder = RunFolder(run)
    folder.model_dirs()
    data = folder.data_for(data)
    df = load_split(data, split, images=images)
    if df is None:
        raise DataError(f"{data} has no test.csv to predict; use --split train, another --data, or --images FOLDER")
    df = df.reset_index(drop=True)
    ok = usable_rows(df, on_bad_image, log)
    pred, decisions = _decisions(run, df, ok, tta, bs, num_workers, log, precision, prevalence)
    _write_preds(df, pred, ok, run, out, decisions)
    log(f"wrote {out}: {len(df)} predictions ({split} split of {data})")
    return Path(out)


def predict_images(run, images, meta=None, tta: int | None = None, out="preds.csv", bs: int = 64,
                   num_workers: int | None = None, on_bad_image: str = "error", log: Callable = print,
                   precision: str | None = None, prevalence: float | None = None) -> Path:
    """Predict every image of a folder (or a list of image paths) with every fold model of `run`: no dataset, no
    training images needed. `meta` (CSV or DataFrame with `image_name`) gives their metadata; images it does not
    cover, or all of them without it, count as of unknown sex, age and site. Writes image_name, pred, run.
    """
    from ..data import image_table

    if tta is not None:
        dihedral_views(tta)
    check_prevalence(run, prevalence)
    RunFolder(run).model_dirs()
    df = image_table(images, meta).reset_index(drop=True)  # images without metadata are counted where they are scored
    ok = usable_rows(df, on_bad_image, log)
    pred, decisions = _decisions(run, df, ok, tta, bs, num_workers, log, precision, prevalence)
    _write_preds(df, pred, ok, run, out, decisions)
    log(f"wrote {out}: {len(df)} predictions from {run}")
    return Path(out)


