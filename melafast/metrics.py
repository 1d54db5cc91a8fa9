"""What a single AUC hides: its uncertainty, clinical operating points, calibration and subgroups.

Plain functions of targets and predictions (numpy in, numbers and DataFrames out), used by `melafast report` and
usable on any out-of-fold table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["logit", "sigmoid", "auc", "pauc", "sens_at_spec", "spec_at_sens", "top_n_sensitivity", "at_prevalence", "bootstrap_pauc", "paired_bootstrap", "PAUC_MIN_TPR", "weighted_auc",
           "bootstrap_auc", "operating_points", "calibration", "age_band", "diagnoses", "calls_by_diagnosis_table", "subgroups", "subgroup_aucs", "AGE_BANDS"]

AGE_BANDS = (0, 30, 45, 60, 75)  # lower edges of the age bands in the subgroup table
PAUC_MIN_TPR = 0.8  # the partial AUC of every table: the ROC area where sensitivity >= 80% (ISIC 2024's metric)


def auc(target, pred) -> float:
    """ROC AUC; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    target = np.asarray(target)
    if len(np.unique(target)) < 2:
        return float("nan")
    return float(roc_auc_score(target, np.asarray(pred, dtype=np.float64)))


def threshold_cuts(target, pred, weights=None):
    """Every distinct threshold at once (melanoma if pred >= it), highest first after `inf` (nothing called melanoma),
    with the melanomas (tp) and benign lesions (fp) at or above each, row `i` counted `weights[i]` times."""
    order = np.argsort(-pred, kind="mergesort")
    ranked, hits = pred[order], target[order]
    w = np.ones(len(pred)) if weights is None else np.asarray(weights, dtype=np.float64)[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each run of equal values
    tp, fp = np.r_[0, np.cumsum(w * hits)[last]], np.r_[0, np.cumsum(w * (1 - hits))[last]]
    return np.r_[np.inf, ranked[last]], tp, fp


def _roc(target, pred, weights=None):
    "The ROC curve's corners (fpr, tpr), one per distinct prediction value, from (0, 0) to (1, 1)."
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    _, tp, fp = threshold_cuts(target, pred, weights)
    return fp / max(fp[-1], 1e-300), tp / max(tp[-1], 1e-300)


def pauc(target, pred, min_tpr: float = PAUC_MIN_TPR, weights=None) -> float:
    """Partial ROC AUC above `min_tpr` true-positive rate: the area between the ROC curve and the horizontal line
    TPR = min_tpr, over the whole FPR axis, i.e. the integral of max(TPR(FPR) - min_tpr, 0) dFPR. Its range is 0 to
    1 - min_tpr (0.2 for the default 0.8; a perfect ranking scores 0.2, chance 0.02). This is the ISIC 2024 challenge
    metric. It is NOT sklearn's `roc_auc_score(max_fpr=...)`, which bounds the FPR axis instead and rescales the area
    to 0.5-1 (McClish). Ties between a melanoma and a benign lesion count half, as in the AUC. NaN with one class.
    Row `i` counts `weights[i]` times (a bootstrap resample)."""
    fpr, tpr = _roc(target, pred, weights)
    if not (fpr[-1] > 0 and tpr[-1] > 0):
        return float("nan")
    # where the curve crosses TPR = min_tpr, add that point, so that every piece above the line is a straight segment
    up = np.flatnonzero((tpr[:-1] < min_tpr) & (tpr[1:] > min_tpr))
    t = (min_tpr - tpr[up]) / (tpr[up + 1] - tpr[up])
    fpr = np.insert(fpr, up + 1, fpr[up] + t * (fpr[up + 1] - fpr[up]))
    tpr = np.insert(tpr, up + 1, np.full(len(up), min_tpr))
    height = np.clip(tpr - min_tpr, 0, None)
    return float(np.sum(np.diff(fpr) * (height[1:] + height[:-1]) / 2))


def sens_at_spec(target, pred, specificity: float = 0.9, weights=None) -> float:
    """The highest sensitivity of any threshold whose specificity is at least `specificity` (the figure clinical
    papers compare at 90%); NaN with one class. Row `i` counts `weights[i]` times."""
    fpr, tpr = _roc(target, pred, weights)
    if not (fpr[-1] > 0 and tpr[-1] > 0):
        return float("nan")
    return float(tpr[1 - fpr >= specificity - 1e-12].max())


def top_n_sensitivity(target, pred, groups, n: int = 15, weights=None) -> float:
    """The ISIC 2024 challenge's secondary metric: of all melanomas, the share found among the `n` highest-scored
    lesions of their own patient (`groups`; ties kept in row order, as pandas' `nlargest`). A row without a patient
    stands alone. Row `i` counts `weights[i]` times (a resample of whole patients gives each patient's rows one
    weight). NaN without melanomas."""
    target = np.asarray(target).astype(int)
    pred = np.asarray(pred, dtype=np.float64)
    groups = pd.Series(groups).reset_index(drop=True)
    codes = pd.factorize(groups.where(groups.notna(), pd.Series([f"\0row{i}" for i in range(len(groups))])))[0]
    order = np.lexsort((np.arange(len(pred)), -pred, codes))  # by patient, highest score first, then row order
    rank = np.empty(len(pred), dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
    within = np.arange(len(pred)) - np.repeat(starts, np.diff(np.r_[starts, len(pred)]))
    rank[order] = within
    w = np.ones(len(pred)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(np.sum(w * target))
    return float(np.sum(w * target * (rank < n)) / total) if total > 0 else float("nan")


def logit(p, eps: float = 1e-7) -> np.ndarray:
    "log(p / (1 - p)), with p kept `eps` away from 0 and 1."
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def sigmoid(x) -> np.ndarray:
    "1 / (1 + exp(-x)): a log-odds back to a probability."
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def at_prevalence(prob, trained: float, prevalence: float):
    """Probabilities moved from the share of melanomas they were learnt at (`trained`) to another (`prevalence`): the
    odds times the ratio of the two prior odds (Bayes' rule; it assumes the images of each class look the same in
    both populations, only their shares differ)."""
    for name, v in (("trained", trained), ("prevalence", prevalence)):
        if not 0 < v < 1:
            raise ValueError(f"{name} prevalence must be between 0 and 1, got {v}")
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1 - 1e-12)
    odds = p / (1 - p) * (prevalence / (1 - prevalence)) / (trained / (1 - trained))
    return odds / (1 + odds)


def spec_at_sens(target, pred, sensitivity: float = 0.9, weights=None) -> float:
    """The highest specificity of any threshold whose sensitivity is at least `sensitivity` (how many benign lesions a
    rule that finds 90% of melanomas clears); NaN with one class. Row `i` counts `weights[i]` times."""
    fpr, tpr = _roc(target, pred, weights)
    if not (fpr[-1] > 0 and tpr[-1] > 0):
        return float("nan")
    return float((1 - fpr[tpr >= sensitivity - 1e-12]).max())


class _Ranked:
    "Targets sorted by prediction once, so that the AUC of any row weighting costs O(n) (no sort)."

    def __init__(self, target, pred):
        self.order = np.argsort(pred, kind="mergesort")
        self.ties = np.r_[0, np.cumsum(np.diff(pred[self.order]) != 0)]  # equal predictions share a tie group
        self.pos = np.asarray(target)[self.order].astype(np.float64)

    def auc(self, weights) -> float:
        w = np.asarray(weights, dtype=np.float64)[self.order]
        w_pos, w_neg = np.bincount(self.ties, w * self.pos), np.bincount(self.ties, w * (1 - self.pos))
        n_pos, n_neg = w_pos.sum(), w_neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(w_neg) - w_neg  # benign weight strictly below each tie group; ties count half
        return float((w_pos * (below + 0.5 * w_neg)).sum() / (n_pos * n_neg))


def weighted_auc(target, pred, weights) -> float:
    """ROC AUC with row `i` counted `weights[i]` times (a bootstrap resample is integer weights)."""
    return _Ranked(np.asarray(target), np.asarray(pred, dtype=np.float64)).auc(weights)


def bootstrap_weights(groups, n: int, n_boot: int, seed: int):
    """Bootstrap resamples as row weights (how often each row was drawn), whole groups when given (a row without one:
    its own group)."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n)
    if groups is not None:  # a row without a group (no patient_id) is its own group, not one group of all such rows
        codes = pd.factorize(pd.Series(groups).to_numpy(), use_na_sentinel=True)[0]
        alone = codes < 0
        codes[alone] = codes.max(initial=-1) + 1 + np.arange(alone.sum())
    n_groups = codes.max() + 1 if len(codes) else 0
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[codes]


def _interval(point: float, values: list, level: float, name: str) -> dict:
    if not values:
        return {name: point, "lo": float("nan"), "hi": float("nan"), "level": level, "n_boot": 0}
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {name: point, "lo": float(lo), "hi": float(hi), "level": level, "n_boot": len(values)}


def bootstrap_auc(target, pred, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """AUC with a percentile bootstrap confidence interval.

    With `groups` (e.g. patient ids) whole groups are resampled, since images of one patient are not independent;
    otherwise rows are. Resamples holding one class only are skipped. Returns auc, lo, hi, level and n_boot (the
    resamples actually used).
    """
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    ranked = _Ranked(target, pred)  # sorted once: each resample is then a vector of row weights
    values = [ranked.auc(w) for w in bootstrap_weights(groups, len(target), n_boot, seed)]
    return _interval(auc(target, pred), [v for v in values if not np.isnan(v)], level, "auc")


def bootstrap_pauc(target, pred, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                   min_tpr: float = PAUC_MIN_TPR) -> dict:
    """`pauc` with a percentile bootstrap interval, resampled as `bootstrap_auc` does. Returns pauc, lo, hi, level,
    n_boot."""
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    values = [pauc(target, pred, min_tpr, w) for w in bootstrap_weights(groups, len(target), n_boot, seed)]
    return _interval(pauc(target, pred, min_tpr), [v for v in values if not np.isnan(v)], level, "pauc")


def paired_bootstrap(target, pred_a, pred_b, groups=None, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0, with_pauc: bool = True) -> pd.DataFrame:
    """AUC and pAUC (above 80% TPR; `with_pauc=False`: AUC only) of two sets of predictions on the same rows, and of
    b - a, each resample drawing the same patients (`groups`; rows without) for both, so that what the two share
    cancels out. One row per metric: a, b, diff (b - a), lo and hi (the percentile interval of the difference),
    b_better (the share of resamples where b scores higher), n_boot (resamples holding both classes)."""
    target = np.asarray(target).astype(int)
    preds = {"a": np.asarray(pred_a, dtype=np.float64), "b": np.asarray(pred_b, dtype=np.float64)}
    ranked = {k: _Ranked(target, p) for k, p in preds.items()}  # sorted once; a resample is then row weights

    def auc_of(k, w):
        return auc(target, preds[k]) if w is None else ranked[k].auc(w)

    def pauc_of(k, w):
        return pauc(target, preds[k], weights=w)

    metrics = {"AUC": auc_of, **({f"pAUC above {PAUC_MIN_TPR:.0%} TPR": pauc_of} if with_pauc else {})}
    diffs = {name: [] for name in metrics}
    for w in bootstrap_weights(groups, len(target), n_boot, seed):
        for name, metric in metrics.items():
            d = metric("b", w) - metric("a", w)
            if not np.isnan(d):
                diffs[name].append(d)
    rows = []
    for name, metric in metrics.items():
        point_a, point_b = metric("a", None), metric("b", None)
        ci = _interval(point_b - point_a, diffs[name], level, "diff")
        rows.append(dict(metric=name, a=point_a, b=point_b, **{k: ci[k] for k in ("diff", "lo", "hi")},
                         b_better=float(np.mean(np.asarray(diffs[name]) > 0)) if diffs[name] else float("nan"),
                         n_boot=ci["n_boot"]))
    return pd.DataFrame(rows)


def _counts(target, pred, threshold) -> dict:
    positive = pred >= threshold
    tp, fp = int((positive & (target == 1)).sum()), int((positive & (target == 0)).sum())
    fn, tn = int((~positive & (target == 1)).sum()), int((~positive & (target == 0)).sum())
    return dict(threshold=float(threshold), sensitivity=tp / max(tp + fn, 1), specificity=tn / max(tn + fp, 1),
                tp=tp, fp=fp, tn=tn, fn=fn)


def operating_points(target, pred, specificities=(0.90, 0.95), sensitivities=(0.90, 0.95)) -> pd.DataFrame:
    """Clinical operating points: the best sensitivity at each specificity of at least `specificities`, and the best
    specificity at each sensitivity of at least `sensitivities`, each with its threshold (melanoma if pred >= it)
    and its confusion counts."""
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    cuts, tp, fp = threshold_cuts(target, pred)
    sens, spec = tp / max(target.sum(), 1), 1 - fp / max((target == 0).sum(), 1)
    rows = []
    for goal, ok, score in [*((f"specificity >= {s:.0%}", spec >= s - 1e-12, sens) for s in specificities),
                            *((f"sensitivity >= {s:.0%}", sens >= s - 1e-12, spec) for s in sensitivities)]:
        best = np.flatnonzero(ok)[np.argmax(score[ok])]
        rows.append(dict(goal=goal, **_counts(target, pred, cuts[best])))
    return pd.DataFrame(rows)


def calibration(target, pred, bins: int = 10) -> dict:
    """Reliability of the probabilities: per equal-width bin the mean prediction and the observed melanoma rate,
    the expected calibration error (bin-size weighted mean of their gaps) and the Brier score."""
    target, pred = np.asarray(target, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    idx = np.minimum((pred * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        if m.any():
            rows.append(dict(lo=b / bins, hi=(b + 1) / bins, images=int(m.sum()), mean_pred=float(pred[m].mean()),
                             melanoma_rate=float(target[m].mean())))
    table = pd.DataFrame(rows)
    ece = float((table["images"] * (table["mean_pred"] - table["melanoma_rate"]).abs()).sum() / len(pred))
    return dict(ece=ece, brier=float(np.mean((pred - target) ** 2)), bins=table)


def age_band(age) -> pd.Series:
    """Age bands for the subgroup table, in order: under 30, 30-44, 45-59, 60-74, 75+, unknown."""
    age = pd.to_numeric(pd.Series(age), errors="coerce")
    edges = [*AGE_BANDS, np.inf]
    labels = [f"under {edges[1]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[1:-2], edges[2:-1])] + [f"{edges[-2]}+"]
    bands = pd.cut(age, edges, right=False, labels=labels).astype(object).where(age.notna(), "unknown")
    return pd.Series(pd.Categorical(bands, categories=[*labels, "unknown"], ordered=True), index=age.index)


def diagnoses(df: pd.DataFrame) -> pd.Series:
    "Each row's diagnosis in lower case ('melanoma' / 'not given' where the data has none)."
    if "diagnosis" in df.columns:
        diag = df["diagnosis"].astype("string").str.strip().str.lower()
        return diag.where(diag.notna() & (diag != ""), "not given").astype(object)
    return pd.Series(np.where(df["target"] == 1, "melanoma", "not given"), index=df.index, dtype=object)


def calls_by_diagnosis_table(df: pd.DataFrame, decision) -> pd.DataFrame:
    """Per diagnosis of `df` (see `diagnoses`): images, melanomas, how many of them the 0/1 `decision` calls melanoma,
    and that share (on a benign diagnosis, 1 - the specificity there)."""
    rows = df.assign(diagnosis=diagnoses(df), called=np.asarray(decision)).groupby("diagnosis").agg(
        images=("called", "size"), melanomas=("target", "sum"), called_melanoma=("called", "sum")).reset_index()
    rows["share called melanoma"] = rows["called_melanoma"] / rows["images"]
    return rows


def subgroups(df: pd.DataFrame, by: dict, min_melanomas: int = 5):
    """The groups of each variable in `by` (name -> Series of group labels aligned with `df`, which holds `target`),
    in table order: a categorical's own order (e.g. age bands), otherwise alphabetical with unknown last. Yields
    (variable, group, rows, note); `note` says why the group gets no AUC (fewer than `min_melanomas` melanomas, or no
    benign lesion), and is "" when it gets one."""
    for name, labels in by.items():
        labels = pd.Series(labels, index=df.index)
        if isinstance(labels.dtype, pd.CategoricalDtype):  # its own order (e.g. age bands)
            order = [c for c in labels.cat.categories if (labels == c).any()]
            labels = labels.astype(object)
        else:  # alphabetical, unknown last
            labels = labels.astype(object).where(labels.notna(), "unknown").astype(str)
            order = sorted(set(labels) - {"unknown"}) + (["unknown"] if (labels == "unknown").any() else [])
        for group in order:
            part = df[(labels == group).to_numpy()]
            n_mel, n_ben = int(part["target"].sum()), int((part["target"] == 0).sum())
            note = (f"too few melanomas for an AUC ({n_mel})" if n_mel < min_melanomas else
                    "no benign lesion" if n_ben == 0 else "")
            yield name, group, part, note


def subgroup_aucs(df: pd.DataFrame, by: dict, min_melanomas: int = 5, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """AUC with a bootstrap interval per group of each variable in `by` (name -> Series of group labels aligned with
    `df`, which holds `target` and `pred`, and `patient_id` to resample by patient when present). Groups with fewer
    than `min_melanomas` melanomas (or no benign lesion) get no AUC: their `note` says why."""
    rows = []
    for name, group, part, note in subgroups(df, by, min_melanomas):
        row = dict(variable=name, group=group, images=len(part), melanomas=int(part["target"].sum()), auc=np.nan,
                   lo=np.nan, hi=np.nan, note=note)
        if not note:
            groups = part["patient_id"] if "patient_id" in part.columns else None
            row.update({k: v for k, v in bootstrap_auc(part["target"], part["pred"], groups, n_boot=n_boot,
                                                       seed=seed).items() if k in ("auc", "lo", "hi")})
        rows.append(row)
    return pd.DataFrame(rows)
