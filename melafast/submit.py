"""Predict with trained runs, blend folds and runs, write and validate a Kaggle submission."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .config import BLENDS
from .errors import DataError, MelafastError, RunError
from .runfolder import RunFolder
from .tta import dihedral_views

__all__ = ["model_dirs", "run_data", "predict_run", "predict_split", "predict_images", "ensemble_runs", "crossfit_blend",
           "read_ensemble",
           "blend", "submission_ids", "write_submission",
           "validate_submission", "make_submission", "BLENDS"]



def model_dirs(run) -> list[Path]:
    """The model folders of a run: its `fold*/` subfolders, or the folder itself if it is one model."""
    return RunFolder(run).model_dirs()


def run_data(run) -> Path | None:
    """The dataset folder a run was trained on (None if not recorded)."""
    return RunFolder(run).data


def data_for_run(run, data=None) -> Path:
    """`data` if given, else the dataset folder `run` was trained on; an error when neither is known."""
    return RunFolder(run).data_for(data)


def _ranks(p) -> np.ndarray:
    return (pd.Series(p).rank(method="average").to_numpy() - 1) / max(len(p) - 1, 1)


def blend(preds: list, method: str = "mean", weights=None) -> np.ndarray:
    """Blend prediction vectors: `mean` of probabilities, or `rank` (ranks scaled to [0, 1]); `weights` default equal."""
    if method not in BLENDS:
        raise MelafastError(f"--blend must be one of {', '.join(BLENDS)}, got {method!r}")
    preds = [np.asarray(p, dtype=np.float64) for p in preds]
    if method == "rank":
        preds = [_ranks(p) for p in preds]
    w = np.full(len(preds), 1 / len(preds)) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return np.tensordot(w, np.stack(preds), axes=1)


def _submitted_preds(oof: pd.DataFrame) -> tuple[str, bool]:
    """The out-of-fold column of the models `submit` loads, and whether it is optimistic: with --keep best the saved
    models are the kept epochs (`pred_selected`, chosen on these rows), else the honest last-epoch models (`pred`)."""
    if "pred_selected" in oof.columns and oof["pred_selected"].notna().all():
        return "pred_selected", True
    return "pred", False


def _oof_table(runs) -> tuple[pd.DataFrame, list]:
    """The runs' out-of-fold predictions side by side (pred0, pred1, ...) on the images every run scored, with the
    first run's fold of each image: each run's predictions of the models it saved, the ones `submit` predicts with.
    Also the runs whose figures are optimistic (their saved models were chosen on these rows)."""
    table, optimistic = None, []
    for i, r in enumerate(runs):
        oof = RunFolder(r).oof(need="ensembles are weighed on out-of-fold predictions of finished runs")
        col, chosen = _submitted_preds(oof)
        if chosen:
            optimistic.append(str(r))
        cols = ["image_name", "target", "fold", col] if i == 0 else ["image_name", col]
        oof = oof[cols].rename(columns={col: f"pred{i}"})
        table = oof if table is None else table.merge(oof, on="image_name")
    if table is None or table.empty or table["target"].nunique() < 2:
        raise RunError("the runs share no out-of-fold images with both classes: were they trained on the same data?")
    return table, optimistic


def _search_weights(ranks: list, target, step: float = 0.05, rounds: int = 20) -> np.ndarray:
    "Weights of a blend of rank vectors that maximise its AUC on `target`, by coordinate steps from equal weights."
    from .evaluate import auc as _auc

    w = np.full(len(ranks), 1 / len(ranks))
    best = _auc(target, blend(ranks, "mean", w))
    for _ in range(rounds):
        improved = False
        for i in range(len(w)):
            for delta in (step, -step):
                cand = w.copy()
                cand[i] = max(0.0, cand[i] + delta)
                if cand.sum() == 0:
                    continue
                cand /= cand.sum()
                auc = _auc(target, blend(ranks, "mean", cand))
                if auc > best + 1e-9:
                    w, best, improved = cand, auc, True
        if not improved:
            break
    return w


def crossfit_blend(preds: list, target, folds) -> tuple[np.ndarray, dict]:
    """An honest weighted rank blend of out-of-fold predictions: each fold's rows are blended with weights searched
    on the other folds' rows only, so no weight ever saw the labels it is scored on.

    Returns the blended vector (score it with any metric) and the weights used for each fold.
    """
    target, folds = np.asarray(target), np.asarray(folds)
    ranks = [_ranks(p) for p in preds]  # ranks use no labels: computed once over every row
    out, per_fold = np.empty(len(target)), {}
    for k in np.unique(folds):
        fit, rows = folds != k, folds == k
        w = _search_weights([r[fit] for r in ranks], target[fit])
        out[rows] = blend([r[rows] for r in ranks], "mean", w)
        per_fold[int(k)] = w.round(4).tolist()
    return out, per_fold


def ensemble_runs(runs, out="ensemble.json", log: Callable = print) -> dict:
    """Score blends of `runs` on their out-of-fold predictions; write the best to `out` for `submit --ensemble`.

    Candidates: mean of probabilities, mean of ranks (neither fits anything), and a weighted rank blend whose score
    is cross-fitted (`crossfit_blend`: weights fitted on the other folds' rows, scored on each held-out fold).
    The weighted blend is chosen only when that honest score beats both equal blends; its weights for the test set
    are then searched on every OOF row.
    """
    from .atomic import write_json
    from .evaluate import auc as _auc

    if len(runs) < 2:
        raise MelafastError("an ensemble needs at least two runs (--run A --run B)")
    table, optimistic = _oof_table(runs)
    if optimistic:
        log(f"  {', '.join(optimistic)} kept each fold's best epoch (--keep best): scored on the predictions of those "
            "models, the ones submit uses, which were chosen on these rows: the figures below are optimistic")
    target, folds = table["target"].to_numpy(), table["fold"].to_numpy()
    preds = [table[f"pred{i}"].to_numpy() for i in range(len(runs))]
    equal = [1 / len(runs)] * len(runs)
    candidates = {"mean": ("mean", equal), "rank": ("rank", equal)}
    scores = {name: _auc(target, blend(preds, m, w)) for name, (m, w) in candidates.items()}
    extra = {}
    if len(np.unique(folds)) >= 2:
        crossfit, per_fold = crossfit_blend(preds, target, folds)
        weights = _search_weights([_ranks(p) for p in preds], target).tolist()
        candidates["weighted rank"] = ("rank", weights)
        scores["weighted rank"] = _auc(target, crossfit)
        extra = dict(crossfit_weights=per_fold,
                     weighted_in_sample_auc=_auc(target, blend(preds, "rank", weights)))
    else:
        log("  (the OOF rows come from one fold only: weights cannot be cross-fitted, so only equal blends compete)")
    for i, r in enumerate(runs):
        log(f"  {_auc(target, preds[i]):.4f}  {r}")
    for name, auc in scores.items():
        how = (f" {np.round(candidates[name][1], 2).tolist()}, cross-fitted over {len(np.unique(folds))} folds"
               if name == "weighted rank" else "")
        log(f"  {auc:.4f}  blend: {name}{how}")
    chosen = max(scores, key=lambda n: (scores[n], n != "weighted rank"))  # ties go to an equal blend
    method, w = candidates[chosen]
    result = dict(runs=[str(Path(r).resolve()) for r in runs], blend=method, weights=w, oof_auc=scores[chosen],
                  chosen=chosen, candidates=scores, n_images=len(table), **extra)
    if optimistic:
        result["optimistic"] = optimistic
    write_json(result, out)
    log(f"chose {chosen} (OOF AUC {scores[chosen]:.4f} on {len(table)} images; no candidate's score was fitted on the "
        f"rows it scores, though taking the best of {len(scores)} flatters it slightly); wrote {out}")
    return result


def submission_ids(data) -> list[str]:
    """Image ids a submission must list, in order: those of sample_submission.csv, else of test.csv (or the ISIC
    2024 layout's test-metadata.csv)."""
    from .data import read_table, split_csv

    data = Path(data)
    for csv in (data / "sample_submission.csv", split_csv(data, "test")):
        if csv.is_file():
            return read_table(csv)["image_name"].tolist()
    raise DataError(f"{data} has neither sample_submission.csv nor test.csv: nothing to submit for")


def submission_id_column(data) -> str:
    "The id column's name a submission for `data` must use: sample_submission.csv's (ISIC 2024: isic_id)."
    template = Path(data) / "sample_submission.csv"
    if template.is_file():
        with open(template, encoding="utf-8") as f:
            first = f.readline().strip().split(",")[0].strip()
        if first == "isic_id":
            return first
    return "image_name"


def validate_submission(path, ids, id_column: str = "image_name") -> None:
    """Raise `DataError` unless `path` is `<id_column>,target` with exactly `ids`, in order, targets in [0, 1]."""
    path = Path(path)
    try:
        sub = pd.read_csv(path, dtype={id_column: str})
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise DataError(f"submission {path} is not a readable CSV ({e})") from None
    if list(sub.columns) != [id_column, "target"]:
        raise DataError(f"submission {path} must have the columns {id_column},target; it has {','.join(sub.columns)}")
    got, want = sub[id_column].tolist(), list(ids)
    if got != want:
        missing, extra = set(want) - set(got), set(got) - set(want)
        raise DataError(f"submission {path} ids differ from the expected {len(want)}: {len(missing)} missing, "
                        f"{len(extra)} extra{', order differs' if not (missing or extra) else ''}")
    t = pd.to_numeric(sub["target"], errors="coerce")
    if t.isna().any():
        raise DataError(f"submission {path} has {int(t.isna().sum())} missing or non-numeric targets")
    if ((t < 0) | (t > 1)).any():
        raise DataError(f"submission {path} has targets outside [0, 1]")


def write_submission(ids, preds, path, id_column: str = "image_name") -> Path:
    """Write `<id_column>,target` (image_name, or ISIC 2024's isic_id) atomically and validate it."""
    from .atomic import atomic_path

    path = Path(path)
    sub = pd.DataFrame({id_column: list(ids), "target": np.clip(np.asarray(preds, dtype=np.float64), 0, 1)})
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False)
        validate_submission(tmp, ids, id_column)
    return path


def make_submission(runs, data=None, tta: int | None = None, blend_method: str = "mean", out="submission.csv",
                    bs: int = 64, num_workers: int | None = None, images=None, on_bad_image: str = "error",
                    weights=None, log: Callable = print, precision: str | None = None, stack: bool = False) -> Path:
    """Predict the test set with every fold of every run, blend, write and validate `out`. `stack=True` (one run):
    the run's stacked trees (`melafast stack`) on the test table and each fold model's image scores instead.

    A test image that cannot be read stops with an error, or with `on_bad_image="skip"` gets the median
    prediction (a submission must list every id).
    """
    from .data import load_split

    if not runs:
        raise MelafastError("name at least one run folder (--run DIR)")
    if tta is not None:
        dihedral_views(tta)
    if blend_method not in BLENDS:
        raise MelafastError(f"--blend must be one of {', '.join(BLENDS)}, got {blend_method!r}")
    if weights is not None and len(weights) != len(runs):
        raise MelafastError(f"{len(weights)} blend weights for {len(runs)} runs")
    for r in runs:
        model_dirs(r)  # fail on a bad run before any prediction starts
    data = data_for_run(runs[0], data)
    test = load_split(data, "test", images=images)  # the training images need not be there
    if test is None:
        raise DataError(f"{data} has no test.csv (nor test-metadata.csv): nothing to predict for a submission")
    ids = submission_ids(data)
    test = test.set_index("image_name", drop=False)
    absent = [i for i in ids if i not in test.index]
    if absent:
        raise DataError(f"{len(absent)} ids of the submission template are not in test.csv, e.g. {', '.join(absent[:3])}")
    test = test.loc[ids].reset_index(drop=True)
    ok = _usable(test, on_bad_image, log)
    if stack:
        final = _stacked(runs, test, ok, data, tta, bs, num_workers, log, precision)
    else:
        final = predict_usable(runs, test, ok, tta, bs, num_workers, blend_method, log, weights, precision)
    path = write_submission(ids, final, out, submission_id_column(data))
    log(f"wrote {path}: {len(ids)} rows from {sum(len(model_dirs(r)) for r in runs)} model(s) in {len(runs)} run(s), "
        f"blend {blend_method}, TTA {f'x{tta}' if tta else 'as each run was made'}; validated")
    return path


def _stacked(runs, test, ok, data, tta, bs, num_workers, log, precision) -> np.ndarray:
    "The stacked predictions of one run's test rows (unusable images: the median)."
    from .predict import _model_preds, fill_unusable
    from .stack import stack_predict

    if len(runs) != 1:
        raise MelafastError("--stack goes with one --run: the run `melafast stack` was fitted on")
    predictor, preds = _model_preds(runs[0], test[ok], tta, bs, num_workers, None, log, precision)
    folds = [int((m.spec.fold if m.spec.fold is not None else i)) for i, m in enumerate(getattr(predictor, "predictors", [predictor]))]
    out = fill_unusable(stack_predict(runs[0], test[ok].reset_index(drop=True), dict(zip(folds, preds)), data), ok)
    log(f"stacked: the trees of {runs[0]} on the test table and each fold model's image scores")
    return out


def read_ensemble(path) -> dict:
    """An ensemble file written by `ensemble_runs`, checked: runs, blend method and one weight per run."""
    try:
        ens = json.loads(Path(path).read_text())
        runs, method, weights = list(ens["runs"]), ens["blend"], [float(w) for w in ens["weights"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MelafastError(f"{path} is not a melafast ensemble file ({e}); write one with melafast ensemble") from None
    if method not in BLENDS or len(weights) != len(runs) or not runs or sum(weights) <= 0:
        raise MelafastError(f"{path}: inconsistent ensemble (blend {method!r}, {len(runs)} runs, {len(weights)} weights)")
    return dict(runs=runs, blend=method, weights=weights)


# predicting lives in melafast.predict; these names stay importable from here
from .predict import predict_images, predict_run, predict_split, predict_usable  # noqa: E402
from .predict import _usable  # noqa: E402
