"""Operating points that hold on new patients: a threshold chosen by a goal (sensitivity or specificity), scored
honestly by cross-fitting, saved in the run, and applied by `predict` as a `decision` column.

Cross-fitting: fold k's threshold is chosen on the other folds' out-of-fold rows only and applied to fold k's rows,
so no row is scored by a threshold chosen on it. The figures of these decisions (sensitivity, specificity, PPV, NPV)
are what a threshold chosen this way does on patients it was not chosen on; the same threshold chosen and scored on
all rows (the in-sample figure) is optimistic.

From the validated scale to `predict`'s: every out-of-fold score is one fold model's (its TTA mean, in its
precision), while `predict` averages the fold models, and a mean of several models is a different score
distribution (narrower: averaging pulls scores towards the middle), so a threshold picked on one is not the same
operating point on the other. `predict` therefore never compares the fold mean with the threshold: each fold model
scores the image as it scored its out-of-fold rows and is compared with the threshold, on the scale it was chosen
on, and the decision is melanoma when at least half of the fold models say so (a tie counts as melanoma, the safe
side). For a one-model run that is exactly the validated rule. `benchmarks/quality.py` measures what the vote
reaches on held-out lesions: on HAM10000 it meets a 90% sensitivity goal on average, but moves with the few
low-scored melanomas of the CV it was chosen on (0.89 to 0.99 over three CV subsets).

With labelled patients the run never trained on (a calibration set: `calibrate.calibrate_operating_point`, `melafast
calibrate`), the operating point is chosen on predict's own scale instead: the calibration images are scored
exactly as `predict` scores new ones (every fold model, the run's TTA, their mean) and the threshold is chosen on
that mean; `predict`'s decision is then the fold mean at or above it. Its figures are cross-fitted on the
calibration set itself (patient-grouped folds of it), with patient-bootstrap intervals.
"""

from __future__ import annotations

import datetime
import re

import numpy as np
import pandas as pd

from ..errors import MelafastError, RunError

__all__ = ["parse_goal", "choose_threshold", "between_scores", "crossfit_decisions", "operating_table",
           "save_operating_point", "check_replace", "oof_patients", "by_measure", "vote", "decide",
           "STANDARD_GOALS", "VOTE_RULE", "ENSEMBLE_RULE", "ppv_npv", "prevalences", "decision_figures",
           "path_figures", "calls_by_diagnosis", "flags_in_words"]

STANDARD_GOALS = ("sens90", "sens95", "spec90", "spec95")  # the rows of the report's operating-point table
VOTE_RULE = ("melanoma when at least half of the fold models score the image at or above the threshold, each as its "
             "out-of-fold scores were made (its TTA, its precision); a tie counts as melanoma")
ENSEMBLE_RULE = ("melanoma when the fold models' mean probability (predict's `pred`, the run's TTA) is at or above the "
                 "threshold, the scale it was chosen on; `votes` counts the fold models at or above it")


def parse_goal(spec) -> dict:
    """`sens90` (sensitivity at least 90%), `spec95` (specificity at least 95%), any level from 50 to 99.9 (`sens97.5`),
    or a fixed probability threshold in (0, 1) (`0.3`). Returns kind ('sens', 'spec' or 'value'), level or
    threshold, and the name used in tables and threshold.json."""
    text = str(spec).strip().lower()
    m = re.fullmatch(r"(sens|spec)(\d{2}(?:\.\d+)?)", text)
    if m and 50 <= float(m.group(2)) < 100:
        kind, level = m.group(1), float(m.group(2)) / 100
        return dict(kind=kind, level=level, name=text,
                    label=f"{'sensitivity' if kind == 'sens' else 'specificity'} >= {float(m.group(2)):g}%")
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value < 1:
        return dict(kind="value", threshold=value, name=f"{value:g}", label=f"threshold {value:g}")
    raise MelafastError(f"unknown operating point {spec!r}: use sensNN (sensitivity at least NN%), specNN (specificity "
                        "at least NN%), NN from 50 to 99.9, e.g. sens90 or spec95, or a probability threshold between "
                        "0 and 1, e.g. 0.3")


def _rates(target, decision, weights=None) -> tuple[float, float]:
    "Sensitivity and specificity of 0/1 `decision`, row i counted weights[i] times (NaN without that class)."
    w = np.ones(len(target)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos, neg = w * (target == 1), w * (target == 0)
    sens = (pos * decision).sum() / pos.sum() if pos.sum() else np.nan
    spec = (neg * (1 - decision)).sum() / neg.sum() if neg.sum() else np.nan
    return float(sens), float(spec)


def ppv_npv(sens: float, spec: float, prevalence: float) -> tuple[float, float]:
    """Positive and negative predictive value of a test with this sensitivity and specificity where a share
    `prevalence` of the lesions are melanomas (Bayes' rule)."""
    p = prevalence
    called, cleared = sens * p + (1 - spec) * (1 - p), spec * (1 - p) + (1 - sens) * p
    return (float(sens * p / called) if called > 0 else np.nan, float(spec * (1 - p) / cleared) if cleared > 0 else np.nan)


def choose_threshold(target, pred, goal) -> float:
    """The threshold (melanoma if pred >= it) that meets `goal` (see `parse_goal`) on these rows: for a sensitivity
    goal the highest one that reaches it (the best specificity there), for a specificity goal the lowest one that
    reaches it (the best sensitivity there); a fixed value as it is."""
    from ..metrics import threshold_cuts

    goal = goal if isinstance(goal, dict) else parse_goal(goal)
    if goal["kind"] == "value":
        return float(goal["threshold"])
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    if target.min(initial=1) == target.max(initial=0):
        raise RunError("an operating point needs melanomas and benign lesions among the rows it is chosen on")
    cuts, tp, fp = threshold_cuts(target, pred)  # cuts[0] = inf (nothing called), then every distinct score, highest first
    sens, spec = tp / tp[-1], 1 - fp / fp[-1]
    ok = (sens if goal["kind"] == "sens" else spec) >= goal["level"] - 1e-12
    i = np.flatnonzero(ok)[0] if goal["kind"] == "sens" else np.flatnonzero(ok)[-1]
    return between_scores(cuts, i)


def between_scores(cuts, i: int) -> float:
    """A threshold that calls what `cuts[i]` calls on these rows, placed halfway to the next lower score (`cuts` from
    `metrics.threshold_cuts`): never on an observed score, so a score that moves in its last digits (another runtime,
    another precision) does not flip the decision of the row the threshold was chosen at. `cuts[i]` = inf (call
    nothing): halfway between the highest score and 1."""
    if not np.isfinite(cuts[i]):
        top = float(cuts[1]) if len(cuts) > 1 else 0.0
        return (top + 1.0) / 2 if top < 1.0 else float(np.nextafter(top, np.inf))
    lower = float(cuts[i + 1]) if i + 1 < len(cuts) else min(0.0, float(cuts[i]) - 1.0)
    return (float(cuts[i]) + lower) / 2


def crossfit_decisions(target, pred, fold, goal) -> tuple[np.ndarray, dict]:
    """0/1 decisions for every row: fold k's rows judged by the threshold chosen on the other folds' rows. Returns the
    decisions and {fold: its threshold}. A fixed threshold is the same for every fold."""
    target, pred, fold = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64), np.asarray(fold)
    folds = sorted(pd.unique(fold))
    if len(folds) < 2 and parse_goal(goal)["kind"] != "value":
        raise RunError("cross-fitted operating points need out-of-fold predictions of at least two folds")
    decision, thresholds = np.zeros(len(pred), dtype=np.int8), {}
    for k in folds:
        mine = fold == k
        t = choose_threshold(target[~mine], pred[~mine], goal)
        decision[mine] = pred[mine] >= t
        thresholds[int(k) if np.issubdtype(type(k), np.integer) else k] = t
    return decision, thresholds


def _figures(target, decision, prevalences, weights=None) -> dict:
    "{(measure, prevalence or None): value} of 0/1 `decision`: sensitivity, specificity, PPV and NPV at each prevalence."
    sens, spec = _rates(target, decision, weights)
    out = {("sensitivity", None): sens, ("specificity", None): spec}
    for p in prevalences:
        out[("PPV", p)], out[("NPV", p)] = ppv_npv(sens, spec, p)
    return out


def decision_figures(target, decision, groups=None, prevalence: float | None = None, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """The sensitivity, specificity, PPV and NPV of fixed 0/1 `decision`s with patient-bootstrap intervals, laid out
    as threshold.json's `crossfit` (see `by_measure`)."""
    from ..metrics import bootstrap_weights

    target = np.asarray(target).astype(int)
    prevs = prevalences(target, prevalence)
    point = _figures(target, decision, prevs)
    boots = [_figures(target, decision, prevs, w) for w in bootstrap_weights(groups, len(target), n_boot, seed)]
    rows = []
    for key, value in point.items():
        vals = np.array([b[key] for b in boots], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2]) if len(vals) else (np.nan, np.nan)
        rows.append(dict(measure=key[0], prevalence=np.nan if key[1] is None else key[1], value=value,
                         lo=float(lo), hi=float(hi)))
    return by_measure(rows, lambda r: None if r["value"] is None else dict(value=r["value"], lo=r["lo"], hi=r["hi"]))


def path_figures(target, pred, blanked, parts, goal, groups, prevalence, n_boot) -> dict | None:
    """The point's cross-fitted figures on each input path: the rows as given, and the same rows with every patient
    field blanked (`blanked`: their scores on that path; None for an image-only run), each part judged by the
    threshold the other parts chose on the scores as given: one threshold serves both paths, and this says how it
    does on each."""
    if blanked is None or len(pd.unique(np.asarray(parts))) < 2:
        return None
    target, parts = np.asarray(target).astype(int), np.asarray(parts)
    given, thresholds = crossfit_decisions(target, pred, parts, goal)
    t = np.array([thresholds[int(k) if np.issubdtype(type(k), np.integer) else k] for k in parts])
    without = (np.asarray(blanked, dtype=np.float64) >= t).astype(np.int8)
    return {"as given": decision_figures(target, given, groups, prevalence, n_boot),
            "no metadata": decision_figures(target, without, groups, prevalence, n_boot)}


def prevalences(target, prevalence) -> list:
    "The data's own prevalence, and the user's when given."
    out = [float(np.mean(target))]
    if prevalence is not None:
        if not 0 < prevalence < 1:
            raise MelafastError(f"--prevalence must be between 0 and 1 (a share of melanomas), got {prevalence}")
        out.append(float(prevalence))
    return out


def operating_table(target, pred, fold, groups=None, goals=STANDARD_GOALS, prevalence: float | None = None,
                    n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """For each goal: the threshold chosen on all rows, and the cross-fitted sensitivity, specificity, PPV and NPV
    (at the data's prevalence and at `prevalence`) with percentile bootstrap intervals over whole `groups`
    (patients), beside the same figures of the threshold chosen and scored on all rows (in-sample: optimistic).
    One row per goal and measure. The bootstrap resamples the cross-fitted decisions; it does not choose again.
    With one fold there is nothing to cross-fit on: the cross-fitted figures are NaN (a fixed threshold is scored)."""
    from ..metrics import bootstrap_weights

    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    prevs = prevalences(target, prevalence)
    one_fold = len(pd.unique(np.asarray(fold))) < 2
    rows = []
    for spec in goals:
        goal = parse_goal(spec)
        t_all = choose_threshold(target, pred, goal)
        optimistic = _figures(target, (pred >= t_all).astype(np.int8), prevs)
        if one_fold and goal["kind"] != "value":  # nothing to cross-fit on: the in-sample figures only
            decision, per_fold = None, {}
            point = {key: np.nan for key in optimistic}
        else:
            decision, per_fold = crossfit_decisions(target, pred, fold, goal)
            point = _figures(target, decision, prevs)
        boots = ([] if decision is None else
                 [_figures(target, decision, prevs, w) for w in bootstrap_weights(groups, len(target), n_boot, seed)])
        for key, value in point.items():
            vals = np.array([b[key] for b in boots], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2]) if len(vals) else (np.nan, np.nan)
            rows.append({"operating point": goal["name"], "goal": goal["label"], "threshold": t_all,
                         "fold thresholds": ", ".join(f"{v:.4f}" for v in per_fold.values()), "measure": key[0],
                         "prevalence": np.nan if key[1] is None else key[1], "cross-fitted": value, "lo": float(lo),
                         "hi": float(hi), "in-sample (optimistic)": optimistic[key]})
    return pd.DataFrame(rows)


def oof_patients(folder, oof) -> pd.Series | None:
    "The patient of each out-of-fold row, from the run's data folder (None when it cannot be read: rows stand alone)."
    if "patient_id" in oof.columns:
        return oof["patient_id"]
    try:
        train = pd.read_csv(folder.data_for(None) / "train.csv", dtype=str,
                            usecols=lambda c: c in ("image_name", "patient_id"))
    except (MelafastError, OSError, ValueError):
        return None
    if "patient_id" not in train.columns:
        return None
    return oof["image_name"].map(train.set_index("image_name")["patient_id"])


def check_replace(folder, replace: bool, log=None) -> None:
    """Before a new operating point is chosen for `folder`: a calibrated one (chosen on patients the run never saw) is
    never replaced without `replace`; any other that is replaced is named to `log` (None: the check alone, as a
    command makes it before any work)."""
    point = folder.operating_point()
    if point is None:
        return
    words = f"{point.operating_point} (threshold {point.threshold:.4f}, chosen on {point.chosen_on})"
    if point.scale == "ensemble" and not replace:
        raise MelafastError(f"{folder.path} already has a calibrated operating point, {words}; pass --replace to "
                            "replace it")
    if log is not None:
        log(f"replacing the operating point {words}")


def save_operating_point(run, spec, prevalence: float | None = None, n_boot: int = 1000, table=None,
                         replace: bool = False, log=print) -> dict:
    """Choose the operating point `spec` (see `parse_goal`) on all of `run`'s out-of-fold rows, and write it, with its
    cross-fitted figures, to the run's threshold.json, from which `predict` and `load_predictor` add a decision.
    `table`: its rows of `operating_table`, when already computed. A calibrated point (`calibrate_operating_point`)
    already saved is replaced only with `replace` (see `check_replace`). Returns what was written."""
    from ..runfolder import RunFolder

    folder = RunFolder(run)
    oof = folder.oof(need="an operating point is chosen on the run's out-of-fold predictions")
    goal = parse_goal(spec)
    check_replace(folder, replace, log)
    if table is None or goal["name"] not in set(table["operating point"]):
        groups = oof_patients(folder, oof)
        table = operating_table(oof["target"], oof["pred"], oof["fold"], groups, [goal["name"]], prevalence, n_boot)
    mine = table[table["operating point"] == goal["name"]]
    rows = mine.to_dict("records")
    meta = folder.train_config().meta if folder.config_file.is_file() else None
    blanked = oof["pred_no_meta"] if meta and "pred_no_meta" in oof.columns and oof["pred_no_meta"].notna().all() \
        else None
    paths = path_figures(oof["target"], oof["pred"], blanked, oof["fold"], goal, oof_patients(folder, oof), prevalence,
                         n_boot)
    point = dict(operating_point=goal["name"], goal=goal["label"], threshold=float(mine["threshold"].iloc[0]),
                 rule=VOTE_RULE, chosen_on=f"{len(oof)} out-of-fold images ({int(oof['target'].sum())} melanomas), "
                 f"each scored by the fold model that did not train on it, TTA x{folder.tta}",
                 tta=folder.tta, n_models=len(folder.model_dirs()), prevalence=prevalence,
                 crossfit=by_measure(rows, lambda r: None if r["cross-fitted"] is None else
                                      dict(value=r["cross-fitted"], lo=r["lo"], hi=r["hi"])),
                 in_sample=by_measure(rows, lambda r: r["in-sample (optimistic)"]),
                 fold_thresholds=mine["fold thresholds"].iloc[0] or None, meta=meta, paths=paths,
                 saved=datetime.datetime.now().isoformat(timespec="seconds"))
    return folder.write_operating_point(point)


def by_measure(rows, value) -> dict:
    """{"sensitivity": .., "specificity": .., "predictive": [{"prevalence": p, "PPV": .., "NPV": ..}, ...]} of the rows
    of one operating point, the data's prevalence first; NaN (not cross-fitted) as null."""
    out, pred = {}, {}
    rows = [{k: (None if isinstance(v, float) and np.isnan(v) and k != "prevalence" else v) for k, v in r.items()}
            for r in rows]
    for r in rows:
        if pd.isna(r["prevalence"]):
            out[r["measure"]] = value(r)
        else:
            pred.setdefault(r["prevalence"], {"prevalence": r["prevalence"]})[r["measure"]] = value(r)
    return {**out, "predictive": list(pred.values())}


def vote(per_model, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The decision of `VOTE_RULE` from each fold model's probabilities (one array each): (0/1 decisions, number of
    models at or above the threshold)."""
    from ..record import OperatingPoint

    return OperatingPoint(threshold).decide(per_model)  # the model scale's rule


def decide(point, per_model) -> tuple[np.ndarray, np.ndarray]:
    """(0/1 decisions, votes) of a saved operating point (an `OperatingPoint` or its dict) from each fold model's
    probabilities: the vote of `VOTE_RULE` for a point chosen on out-of-fold scores, the fold mean against the
    threshold (`ENSEMBLE_RULE`) for one chosen on a calibration set. `votes` is the number of models at or above it."""
    from ..record import OperatingPoint

    return (point if isinstance(point, OperatingPoint) else OperatingPoint.from_dict(point)).decide(per_model)


def calls_by_diagnosis(df: pd.DataFrame, point) -> tuple[pd.DataFrame, str] | None:
    """Which diagnoses a saved operating point calls melanoma on the out-of-fold rows `df` (None when the data names
    no diagnosis): per diagnosis, images, melanomas, how many it calls melanoma and that share (on a benign
    diagnosis, 1 - its specificity), most melanomas first; and how the decisions were made, in words."""
    from ..metrics import calls_by_diagnosis_table

    if "diagnosis" not in df.columns:
        return None
    how, decision = "the cross-fitted decisions (each fold judged by the threshold the other folds chose)", None
    if point.scale == "model" and point.operating_point != "threshold":  # a goal chosen on these rows: re-fit it
        try:
            decision = crossfit_decisions(df["target"], df["pred"], df["fold"], point.operating_point)[0]
        except RunError:  # one fold: nothing to cross-fit on
            pass
    if decision is None:
        decision = (df["pred"] >= point.threshold).to_numpy().astype(int)
        how = "each out-of-fold score against the threshold (one model's score, not the fold mean: indicative)"
    rows = calls_by_diagnosis_table(df, decision)
    return rows.sort_values(["melanomas", "share called melanoma"], ascending=[False, False]), how


def flags_in_words(calls: tuple[pd.DataFrame, str], point) -> str:
    "One sentence of `calls_by_diagnosis`: the share of each benign diagnosis the point calls melanoma, most first."
    rows, how = calls
    rows = rows.rename(columns={"share called melanoma": "share"})
    benign, mel = rows[rows["melanomas"] == 0].sort_values("share", ascending=False), rows[rows["melanomas"] > 0]
    caught = f"; it calls {mel['called_melanoma'].sum() / mel['images'].sum():.0%} of melanomas" if len(mel) else ""
    return (f"At the operating point in force ({point.operating_point}, threshold {point.threshold:.4f}), the benign "
            "diagnoses it calls melanoma (1 - specificity on each): "
            + ", ".join(f"{r.diagnosis} {r.share:.0%} of {r.images}" for r in benign.itertuples())
            + f"{caught} (from {how}).")
