"""How `melafast stack` fits its models so that the stack never ranks worse than the image score it is given.

Three things go wrong when trees learn from out-of-fold image scores, and each has its remedy here:

- each fold model scores on its own scale (one model's typical benign logit is -3.0, another's -2.2), so a pooled
  score ranks worse than any one fold. The score enters as `z`: its logit standardised over the rows its own model
  scored (mean and standard deviation kept per fold model, and applied to that model's test scores);
- trees with many small leaves, run for a fixed number of rounds, cannot even reproduce one strong feature on a
  thousand rows. They are kept monotone in `z`, with few large leaves, and their number of rounds is the one with
  the lowest log loss on inner folds: the other folds of the run, each held out in turn from the training rows
  (never the rows being scored);
- when the table carries nothing the image score lacks, any model of it adds noise. The stack answers
  `z + w * correction`, where the correction is what the model says beyond a logistic fit of `z` alone (in units of
  `z`), and the weight `w` (0, 0.1, ..., 1) is the one whose worst inner fold ranks best against the image score
  alone, kept only when the gain over the pooled inner rows holds up under a paired bootstrap of their patients
  (one-sided 90%). The table gets a weight only where the inner folds show that it helps; 0 leaves the image score
  untouched. Each fold's stacked scores are then put on one scale, as `z` was.

Each fold's model is then refitted on all its training rows, on several bags (80% of the patients each, seeded),
and their margins averaged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import RunError
from .learners import MAX_ROUNDS, Learner

__all__ = ["WEIGHTS", "FoldFit", "image_scale", "scaled", "calibration", "cross_fit", "combine"]

WEIGHTS = tuple(round(w, 1) for w in np.linspace(0, 1, 11))
BAG_SHARE = 0.8  # of a training fold's patients in each bag
GATE_BOOT, GATE_RISK = 200, 0.1  # the table's weight needs its inner gain's one-sided 90% bound above 0
MIN_SLOPE = 0.05  # a logistic slope of z below this is taken as this (an image score with no signal)


def _logit(p) -> np.ndarray:
    from ..metrics import logit

    return logit(p, eps=1e-6)


def image_scale(pred) -> tuple:
    "(mean, standard deviation) of the logits of one fold model's scores on the rows it validated."
    return image_scale_of(_logit(pred))


def image_scale_of(score) -> tuple:
    "(mean, standard deviation) of scores already on the logit scale."
    score = np.asarray(score, dtype=np.float64)
    return float(score.mean()), float(max(score.std(), 1e-6))


def scaled(pred, scale) -> np.ndarray:
    "One fold model's scores as `z`: their logits on the scale of the rows it validated."
    return (_logit(pred) - scale[0]) / scale[1]


def calibration(z, y) -> tuple:
    "(intercept, slope) of a logistic fit of `y` on `z` alone (slope at least MIN_SLOPE)."
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(np.asarray(z)[:, None], y)
    return float(lr.intercept_[0]), float(max(lr.coef_[0, 0], MIN_SLOPE))


def _correction(margin, z, calib) -> np.ndarray:
    "What a model's margin says beyond the logistic fit of z alone, in units of z."
    return (np.asarray(margin) - calib[0] - calib[1] * np.asarray(z)) / calib[1]


def combine(z, margin, calib, weight, scale=(0.0, 1.0)) -> np.ndarray:
    """The stacked score of rows: `z` moved by `weight` times the model's correction (see the module's note), then
    put on the scale of the rows its fold scored (`scale`: their mean and standard deviation), as `z` was."""
    return (np.asarray(z) + weight * _correction(margin, z, calib) - scale[0]) / scale[1]


def _auc(y, s) -> float:
    from ..metrics import auc

    return auc(y, s)


def _inner_folds(folds, groups, y, seed) -> np.ndarray:
    """The inner folds of a training set: the run's folds it holds, or (only one) its patients split in two, those
    with a melanoma dealt alternately so that both halves hold some."""
    if len(np.unique(folds)) >= 2:
        return np.asarray(folds)
    keys = np.asarray(groups if groups is not None else np.arange(len(folds))).astype(str)
    uniq = np.random.default_rng(seed).permutation(np.unique(keys))
    positive = set(keys[np.asarray(y) == 1])
    order = [k for k in uniq if k in positive] + [k for k in uniq if k not in positive]
    half = {k: i % 2 for i, k in enumerate(order)}
    return np.array([half[k] for k in keys])


def _bag(groups, b, seed) -> np.ndarray:
    "Rows of bag `b`: BAG_SHARE of the patients (`groups`: each row's patient), seeded."
    keys = np.asarray(groups).astype(str)
    uniq = np.unique(keys)
    take = np.random.default_rng([seed, b]).permutation(uniq)[: max(1, int(round(BAG_SHARE * len(uniq))))]
    return np.isin(keys, take)


@dataclass
class FoldFit:
    "One outer fold's stack: its rounds, weight, calibration of z, and bagged models (fitted on the other folds)."

    fold: int
    rounds: int | None
    weight: float
    calib: tuple
    inner_auc: dict  # the inner folds' AUC at each weight
    models: list = field(default_factory=list)
    scale: tuple = (0.0, 1.0)  # mean and sd of its stacked scores on the rows it scored
    seconds: float = 0.0


def _choose(learner: Learner, X, y, z, inner, groups, seed) -> tuple:
    "(rounds, weight, inner AUC by weight) from the inner folds of one training set."
    curves, fitted = 0.0, {}
    for j in np.unique(inner):
        tr = inner != j
        if len(np.unique(y[tr])) < 2 or len(np.unique(y[~tr])) < 2:
            raise RunError("an inner fold of the stack holds one class only: too few melanomas for a stack "
                           "(train the run with fewer folds)")
        model, curve = learner.fit(X[tr], y[tr], MAX_ROUNDS, seed, curve=(X[~tr], y[~tr]))
        curves = curves + curve * (~tr).sum()
        fitted[j] = (model, calibration(z[tr], y[tr]))
    rounds = int(np.argmin(curves)) + 1 if learner.rounds else None
    corr = np.zeros(len(y))
    for j, (model, calib) in fitted.items():
        held = inner == j
        corr[held] = _correction(learner.margin(model, X[held], rounds), z[held], calib)
    # the weight whose worst inner fold gains most over the image score alone (0 gains 0; ties: the smaller weight),
    # kept only when the gain over the pooled inner rows holds up under a paired bootstrap of their patients
    parts = [inner == j for j in fitted]
    base = [_auc(y[p], z[p]) for p in parts]
    worst = {w: min(_auc(y[p], z[p] + w * corr[p]) - b for p, b in zip(parts, base)) for w in WEIGHTS}
    best = max(worst.values())
    weight = min(w for w, g in worst.items() if g >= best - 1e-12)
    pooled = {w: _per_part(z + w * corr, parts) for w in WEIGHTS}
    if weight > 0:
        from ..metrics import paired_bootstrap

        cmp = paired_bootstrap(y, pooled[0.0], pooled[weight], groups, n_boot=GATE_BOOT, level=1 - 2 * GATE_RISK,
                               seed=seed, with_pauc=False).iloc[0]
        weight = weight if cmp["lo"] > 0 else 0.0
    return rounds, weight, {w: _auc(y, s) for w, s in pooled.items()}


def _standardised(score, scale=None) -> np.ndarray:
    "`score` on `scale` (mean, standard deviation; by default its own)."
    m, sd = scale or image_scale_of(score)
    return (np.asarray(score, dtype=np.float64) - m) / sd


def _per_part(score, parts) -> np.ndarray:
    "`score` standardised within each part (inner fold): each inner model's offset would mis-rank them pooled."
    out = np.array(score, dtype=np.float64)
    for p in parts:
        out[p] = _standardised(out[p])
    return out


def cross_fit(learner: Learner, X, y, folds, groups=None, bags: int = 5, seed: int = 0,
              log: Callable = print) -> tuple:
    """Fit the stack on each of the run's folds from the others' rows. `X`: the inputs, `z` last; `groups`: each
    row's patient (bags draw whole patients). Answers (stacked z of every row, the model's own score of every row
    with weight 1, [FoldFit])."""
    X, y, folds = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int), np.asarray(folds)
    groups = None if groups is None else np.asarray(groups, dtype=object)
    z = X[:, -1]
    stacked, alone, fits = np.zeros(len(y)), np.zeros(len(y)), []
    for k in sorted(np.unique(folds)):
        t0 = time.perf_counter()
        mine = folds == k
        tr = ~mine
        if len(np.unique(y[tr])) < 2:
            raise RunError(f"the folds other than {k} hold one class only: the stack cannot learn from them")
        g_tr = None if groups is None else groups[tr]
        inner = _inner_folds(folds[tr], g_tr, y[tr], seed)
        rounds, weight, by_weight = _choose(learner, X[tr], y[tr], z[tr], inner, g_tr, seed)
        calib = calibration(z[tr], y[tr])
        fit = FoldFit(int(k), rounds, weight, calib, by_weight)
        margins = []
        for b in range(bags if learner.rounds else 1):  # a logistic fit is the same on every bag: fit it once
            rows = _bag(g_tr if g_tr is not None else np.arange(tr.sum()), b, seed) if learner.rounds else \
                np.ones(tr.sum(), dtype=bool)
            model, _ = learner.fit(X[tr][rows], y[tr][rows], rounds or 1, seed + b)
            fit.models.append(model)
            margins.append(learner.margin(model, X[mine], rounds))
        margin = np.mean(margins, axis=0)
        # each fold's stacked scores on one scale (their mean and sd on the rows it scores, fixed for the test rows):
        # the correction shifts a fold's scores by its own amount, which would mis-rank the folds pooled together
        raw = combine(z[mine], margin, calib, weight)
        fit.scale = image_scale_of(raw)
        stacked[mine] = _standardised(raw, fit.scale)
        alone[mine] = _standardised(combine(z[mine], margin, calib, 1.0))
        fit.seconds = time.perf_counter() - t0
        fits.append(fit)
        log(f"  fold {k}: " + (f"{rounds} rounds, " if rounds else "") + f"the table's weight {weight:.1f} (inner "
            f"AUC {by_weight[weight]:.4f} against {by_weight[0.0]:.4f} for the image score alone), "
            f"{len(fit.models)} model(s) in {fit.seconds:.1f} s")
    return stacked, alone, fits
