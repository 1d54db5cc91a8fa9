"""The one evaluation object: the figures of a set of scored rows, computed here and only rendered elsewhere.

`Evaluation(rows)` takes rows with a `target` (1 melanoma) and a score (`pred`), and `patient_id` when known (the
bootstrap then resamples whole patients: one patient's images are not independent). The report, the card, the
comparison of runs and a run's results.json all read their figures from it, so a measure added to `HEADLINE`
appears on every page, with its interval, without another edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import pandas as pd

from ..metrics import (PAUC_MIN_TPR, age_band, auc, bootstrap_weights, calibration, pauc, sens_at_spec, spec_at_sens,
                       subgroup_aucs, top_n_sensitivity, weighted_auc)

__all__ = ["Measure", "HEADLINE", "Evaluation", "SITE", "SUBGROUPS"]

SITE = "anatom_site_general_challenge"
# the default subgroup variables and their columns (skin tone: estimated from the images, `data.signatures`)
SUBGROUPS = {"sex": "sex", "age": "age_approx", "site": SITE, "skin tone (ITA)": "skin_tone"}


@dataclass(frozen=True)
class Measure:
    "One headline figure: `fn(target, pred, weights)` -> float, where row `i` counts `weights[i]` times (or once)."

    key: str  # the name in results.json, evaluation tables and the card's metadata
    name: str  # what a page calls it
    fn: Callable
    digits: int = 4
    about: str = ""  # one line a page may print beside it
    by_patient: bool = False  # `fn(target, pred, weights, groups)`: it needs each row's patient (NaN without them)


def _auc(target, pred, weights=None) -> float:
    return auc(target, pred) if weights is None else weighted_auc(target, pred, weights)


HEADLINE = (
    Measure("auc", "ROC AUC", _auc, about="the chance that a melanoma scores above a benign lesion"),
    Measure("pauc", f"partial AUC above {PAUC_MIN_TPR:.0%} sensitivity", lambda t, p, w=None: pauc(t, p, weights=w),
            about=f"the ROC area where sensitivity is at least {PAUC_MIN_TPR:.0%}, 0 to {1 - PAUC_MIN_TPR:.1f}: "
                  "the ISIC 2024 metric"),
    Measure("sens_at_spec90", "sensitivity at 90% specificity", lambda t, p, w=None: sens_at_spec(t, p, 0.9, w), 3,
            about="the melanomas found by a rule that clears 9 in 10 benign lesions"),
    Measure("spec_at_sens90", "specificity at 90% sensitivity", lambda t, p, w=None: spec_at_sens(t, p, 0.9, w), 3,
            about="the benign lesions cleared by a rule that finds 9 in 10 melanomas"),
    Measure("top15_sens", "sensitivity within each patient's 15 highest scores",
            lambda t, p, w=None, g=None: top_n_sensitivity(t, p, g, 15, w), 3, by_patient=True,
            about="the ISIC 2024 secondary metric: the share of melanomas among the 15 lesions scored highest in "
                  "their own patient (needs patient ids)"),
)


def _value(m: Measure, target, pred, weights=None, groups=None) -> float:
    "One measure on some rows; a by-patient measure is NaN where the rows name no patient."
    if not m.by_patient:
        return m.fn(target, pred, weights)
    return float("nan") if groups is None else m.fn(target, pred, weights, groups)


class Evaluation:
    """The figures of scored `rows` (columns `target`, `score`, optional `patient_id`, `fold` and metadata): headline
    measures with patient-bootstrap intervals (`n_boot` resamples, 0 for point values only), per fold, calibration,
    subgroups over any column, operating points, and paired differences from another evaluation of the same rows."""

    def __init__(self, rows: pd.DataFrame, score: str = "pred", n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, measures: tuple | None = None):
        self.rows, self.score, self.n_boot, self.seed, self.level = rows, score, n_boot, seed, level
        self.measures = HEADLINE if measures is None else measures  # read when made: a measure added is shown
        self.target = rows["target"].to_numpy().astype(int)
        self.pred = rows[score].to_numpy(dtype=np.float64)
        self.groups = rows["patient_id"] if "patient_id" in rows.columns else None
        self._subgroups = {}

    @property
    def n_images(self) -> int:
        return len(self.rows)

    @property
    def n_melanomas(self) -> int:
        return int(self.target.sum())

    @property
    def n_patients(self) -> int | None:
        return None if self.groups is None else int(self.groups.nunique())

    def _weights(self):
        return bootstrap_weights(self.groups, len(self.target), self.n_boot, self.seed)

    def _interval(self, values) -> tuple[float, float]:
        values = [v for v in values if not np.isnan(v)]
        if not values:
            return float("nan"), float("nan")
        lo, hi = np.quantile(values, [(1 - self.level) / 2, 1 - (1 - self.level) / 2])
        return float(lo), float(hi)

    @cached_property
    def headline(self) -> pd.DataFrame:
        "One row per measure: key, figure, value, lo, hi (the percentile interval), digits, about."
        boots = {m.key: [] for m in self.measures}
        for w in self._weights():  # one set of resampled patients for every measure
            for m in self.measures:
                boots[m.key].append(_value(m, self.target, self.pred, w, self.groups))
        return pd.DataFrame([dict(key=m.key, figure=m.name, value=_value(m, self.target, self.pred, None, self.groups),
                                  **dict(zip(("lo", "hi"), self._interval(boots[m.key]))), digits=m.digits,
                                  about=m.about) for m in self.measures])

    def value(self, key: str) -> float:
        "One headline measure's value."
        return float(self.headline.set_index("key").loc[key, "value"])

    @cached_property
    def per_fold(self) -> pd.DataFrame:
        "fold, images, melanomas and every headline measure (point values), one row per fold."
        rows = []
        for k, part in self.rows.groupby("fold"):
            t, p = part["target"].to_numpy().astype(int), part[self.score].to_numpy(dtype=np.float64)
            g = part["patient_id"] if self.groups is not None else None
            rows.append(dict(fold=int(k), images=len(part), melanomas=int(t.sum()),
                             **{m.key: _value(m, t, p, None, g) for m in self.measures}))
        return pd.DataFrame(rows)

    @cached_property
    def calibration(self) -> dict:
        "bins (a table), ece and brier: see `metrics.calibration`."
        return calibration(self.target, self.pred)

    def subgroups(self, columns: dict | None = None, min_melanomas: int = 5) -> pd.DataFrame:
        """AUC with its patient-bootstrap interval per group of each variable: `columns` maps a name to a column of
        the rows (default `SUBGROUPS`: sex, age band, site, where present); an age column is read in age bands."""
        columns = SUBGROUPS if columns is None else columns
        key = (tuple(sorted(columns.items())), min_melanomas)
        if key not in self._subgroups:
            by = {name: age_band(self.rows[col]) if col == "age_approx" else self.rows[col]
                  for name, col in columns.items() if col in self.rows.columns}
            scored = self.rows.assign(pred=self.pred)
            self._subgroups[key] = subgroup_aucs(scored, by, min_melanomas=min_melanomas, n_boot=max(self.n_boot, 1),
                                                 seed=self.seed)
        return self._subgroups[key]

    def below_whole(self, columns: dict | None = None) -> pd.DataFrame:
        """The subgroups (see `subgroups`) whose AUC interval lies wholly below the AUC of all the rows: the patients
        the model serves measurably worse. Worst first."""
        groups = self.subgroups(columns)
        low = groups[groups["hi"].notna() & (groups["hi"] < self.value("auc"))]
        return low.sort_values("auc").reset_index(drop=True)

    def operating(self, goals, prevalence: float | None = None) -> pd.DataFrame:
        "Cross-fitted operating-point figures of each goal (see `operating.operating_table`)."
        from .operating import operating_table

        return operating_table(self.target, self.pred, self.rows["fold"], self.groups, goals, prevalence,
                               max(self.n_boot, 1), self.level, self.seed)

    def paired(self, other: "Evaluation") -> pd.DataFrame:
        """Each measure of `other` minus this one's, on the same rows and with the same patients drawn for both in
        every resample (so what they share cancels): figure, a, b, diff, lo, hi, b_better (the share of resamples
        where `other` scores higher), resamples."""
        if len(other.target) != len(self.target) or (other.target != self.target).any():
            raise ValueError("a paired comparison needs the same rows, in the same order, with the same labels")
        diffs = {m.key: [] for m in self.measures}
        for w in self._weights():
            for m in self.measures:
                d = (_value(m, other.target, other.pred, w, self.groups)
                     - _value(m, self.target, self.pred, w, self.groups))
                if not np.isnan(d):
                    diffs[m.key].append(d)
        rows = []
        for m in self.measures:
            a, b = _value(m, self.target, self.pred, None, self.groups), _value(m, other.target, other.pred, None,
                                                                                self.groups)
            lo, hi = self._interval(diffs[m.key])
            rows.append(dict(key=m.key, figure=m.name, a=a, b=b, diff=b - a, lo=lo, hi=hi,
                             b_better=float(np.mean(np.asarray(diffs[m.key]) > 0)) if diffs[m.key] else float("nan"),
                             resamples=len(diffs[m.key])))
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        "The figures as plain JSON values (counts, headline with intervals, per fold, calibration)."
        def clean(v):
            return None if isinstance(v, float) and np.isnan(v) else v

        return dict(images=self.n_images, melanomas=self.n_melanomas, patients=self.n_patients,
                    bootstrap=dict(resamples=self.n_boot, level=self.level, by="patient" if self.groups is not None
                                   else "image"),
                    headline={r.key: dict(value=clean(r.value), lo=clean(r.lo), hi=clean(r.hi))
                              for r in self.headline.itertuples()},
                    per_fold=[{k: clean(v) for k, v in r.items()} for r in self.per_fold.to_dict("records")]
                    if "fold" in self.rows.columns else [],
                    calibration=dict(ece=self.calibration["ece"], brier=self.calibration["brier"]))
