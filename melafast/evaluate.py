"""What a single AUC hides: its uncertainty, clinical operating points, calibration and subgroups.

Plain functions of targets and predictions (numpy in, numbers and DataFrames out), used by `melafast report` and
usable on any out-of-fold table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["auc", "weighted_auc", "bootstrap_auc", "operating_points", "calibration", "age_band", "subgroup_aucs", "AGE_BANDS"]

AGE_BANDS = (0, 30, 45, 60, 75)  # lower edges of the age bands in the subgroup table


def auc(target, pred) -> float:
    """ROC AUC; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    target = np.asarray(target)
    if len(np.unique(target)) < 2:
        return float("nan")
    return float(roc_auc_score(target, np.asarray(pred, dtype=np.float64)))


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


def bootstrap_auc(target, pred, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """AUC with a percentile bootstrap confidence interval.

    With `groups` (e.g. patient ids) whole groups are resampled, since images of one patient are not independent;
    otherwise rows are. Resamples holding one class only are skipped. Returns auc, lo, hi, level and n_boot (the
    resamples actually used).
    """
    target, pred = np.asarray(target).astype(int), np.asarray(pred, dtype=np.float64)
    point = auc(target, pred)
    rng = np.random.default_rng(seed)
    codes = (pd.factorize(pd.Series(groups).fillna("\0missing").to_numpy())[0] if groups is not None
             else np.arange(len(target)))
    n_groups = codes.max() + 1 if len(codes) else 0
    # sort once by prediction; each resample is then a vector of row weights (how often each row was drawn)
    ranked = _Ranked(target, pred)
    aucs = []
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)  # times each group is drawn
        value = ranked.auc(drawn[codes])
        if not np.isnan(value):
            aucs.append(value)
    if not aucs:
        return dict(auc=point, lo=float("nan"), hi=float("nan"), level=level, n_boot=0)
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return dict(auc=point, lo=float(lo), hi=float(hi), level=level, n_boot=len(aucs))


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
    # every distinct cut at once: sort by prediction, count melanomas and benign lesions at or above each value
    order = np.argsort(-pred, kind="mergesort")
    ranked, hits = pred[order], target[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each run of equal values
    tp = np.r_[0, np.cumsum(hits)[last]]
    fp = np.r_[0, last + 1] - tp
    cuts = np.r_[np.inf, ranked[last]]  # inf: nothing called melanoma
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


def subgroup_aucs(df: pd.DataFrame, by: dict, min_melanomas: int = 5, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """AUC with a bootstrap interval per group of each variable in `by` (name -> Series of group labels aligned with
    `df`, which holds `target` and `pred`, and `patient_id` to resample by patient when present). Groups with fewer
    than `min_melanomas` melanomas (or no benign lesion) get no AUC: their `note` says why."""
    rows = []
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
            row = dict(variable=name, group=group, images=len(part), melanomas=n_mel, auc=np.nan, lo=np.nan,
                       hi=np.nan, note="")
            if n_mel < min_melanomas or n_ben == 0:
                row["note"] = f"too few melanomas for an AUC ({n_mel})" if n_mel < min_melanomas else "no benign lesion"
            else:
                groups = part["patient_id"] if "patient_id" in part.columns else None
                row.update({k: v for k, v in bootstrap_auc(part["target"], part["pred"], groups, n_boot=n_boot,
                                                           seed=seed).items() if k in ("auc", "lo", "hi")})
            rows.append(row)
    return pd.DataFrame(rows)
