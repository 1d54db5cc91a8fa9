"""Blends of fold models and of runs: mean or rank blends, and run weights cross-fitted on the runs' out-of-fold rows
(`melafast ensemble` writes them, `submit --ensemble` reads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..config import BLENDS
from ..errors import MelafastError, RunError
from ..runfolder import RunFolder

__all__ = ["blend", "crossfit_blend", "ensemble_runs", "read_ensemble"]


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
    from ..metrics import auc as _auc

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
    from ..atomic import write_json
    from ..metrics import auc as _auc

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
