"""The stack's parts on synthetic tables (no run needed): every learner saves as text that reproduces it, stays
monotone in the image score, picks its rounds from its log-loss curve; the cross-fitting never lets a fold's rows
shape its own predictions, keeps the image score when the table is noise and uses the table when it carries signal."""

import importlib.util
import json

import numpy as np
import pytest

from melafast.inference.learners import LEARNERS, PACKAGES, learner
from melafast.inference.stackfit import cross_fit, image_scale, scaled
from melafast.metrics import auc

AVAILABLE = [m for m in LEARNERS if m not in PACKAGES or importlib.util.find_spec(PACKAGES[m])]


def _table(n=900, seed=0, table_signal=0.0, folds=3):
    """Rows with a patient id, a fold, two table columns (one with missing values; `table_signal` sets how much the
    first tells about the label beyond the image score) and the image score's z last."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(int)
    image = 1.3 * y + rng.normal(size=n)
    a = table_signal * y + rng.normal(size=n)
    b = rng.normal(size=n)
    b[rng.random(n) < 0.2] = np.nan
    patients = rng.integers(0, n // 3, n)
    fold = patients % folds
    return np.c_[a, b, image], y, fold, patients.astype(str)


@pytest.mark.parametrize("name", AVAILABLE)
def test_each_learner_reloads_from_its_text_and_stays_monotone(name):
    X, y, _, _ = _table(600, seed=1, table_signal=1.0)
    kind = learner(name)
    model, curve = kind.fit(X[:400], y[:400], 60, seed=0, curve=(X[400:], y[400:]))
    rounds = 60 if kind.rounds else None
    text = kind.dump(model)
    assert "pickle" not in text[:200].lower()
    if name in ("trees", "logistic", "xgboost", "catboost"):
        json.loads(text)  # plain JSON
    else:
        assert text.startswith("tree")  # LightGBM's text model
    again = kind.load(text)
    assert np.allclose(kind.margin(again, X[400:], rounds), kind.margin(model, X[400:], rounds), atol=1e-6)
    # the curve is the mean log loss after each round on the rows given
    assert len(curve) == (60 if kind.rounds else 1)
    m = kind.margin(model, X[400:], 60 if kind.rounds else None)
    assert curve[-1] == pytest.approx(np.mean(np.logaddexp(0, m) - y[400:] * m), rel=1e-4, abs=1e-5)
    # monotone in the image score: raising it never lowers the margin, whatever the other columns
    up = X[400:].copy()
    up[:, -1] += 0.7
    assert (kind.margin(model, up, rounds) >= kind.margin(model, X[400:], rounds) - 1e-9).all()


def test_scikit_learn_trees_are_walked_as_scikit_learn_scores_them():
    from sklearn.ensemble import HistGradientBoostingClassifier

    from melafast.inference import learners

    X, y, _, _ = _table(500, seed=2, table_signal=1.0)
    kind = learner("trees")
    model, _ = kind.fit(X, y, 40, seed=0)
    ref = HistGradientBoostingClassifier(learning_rate=learners.SHAPE["learning_rate"], max_iter=40,
                                         max_leaf_nodes=learners.SHAPE["leaves"], min_samples_leaf=learners._min_leaf(500),
                                         l2_regularization=learners.SHAPE["l2"], early_stopping=False,
                                         monotonic_cst=[0, 0, 1], random_state=0).fit(X, y)
    assert np.allclose(kind.margin(model, X), ref.decision_function(X), atol=1e-10)
    assert np.allclose(kind.margin(model, X, 7), list(ref.staged_decision_function(X))[6], atol=1e-10)


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    from melafast.errors import MelafastError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightgbm" else real(name, *a))
    with pytest.raises(MelafastError, match=r"pip install 'melafast\[boost\]'"):
        learner("lightgbm")
    with pytest.raises(MelafastError, match="one of trees, lightgbm"):
        learner("forest")


def test_per_fold_scaling_puts_fold_models_on_one_scale():
    rng = np.random.default_rng(3)
    y = (rng.random(1500) < 0.2).astype(int)
    fold = np.arange(1500) % 3
    logit = 1.5 * y + rng.normal(size=1500) + np.array([-3.0, -1.0, 1.0])[fold]  # each model on its own offset
    pred = 1 / (1 + np.exp(-logit))
    z = np.zeros(1500)
    for k in range(3):
        z[fold == k] = scaled(pred[fold == k], image_scale(pred[fold == k]))
    per_fold = np.mean([auc(y[fold == k], pred[fold == k]) for k in range(3)])
    assert auc(y, pred) < per_fold - 0.03  # pooled as given, the offsets cost ranking
    assert auc(y, z) > per_fold - 0.01


def test_a_folds_own_rows_never_shape_its_predictions():
    X, y, fold, patients = _table(600, seed=4, table_signal=1.0)
    kind = learner("trees")
    first, _, _ = cross_fit(kind, X, y, fold, patients, bags=2, seed=0, log=lambda m: None)
    y2 = y.copy()
    mine = fold == 0
    y2[mine] = np.random.default_rng(0).permutation(y[mine])  # fold 0's labels shuffled
    second, _, _ = cross_fit(kind, X, y2, fold, patients, bags=2, seed=0, log=lambda m: None)
    assert np.array_equal(first[mine], second[mine])
    assert not np.array_equal(first[~mine], second[~mine])  # the other folds learnt from fold 0's rows


@pytest.mark.parametrize("name", ["trees", "logistic"])
def test_noise_in_the_table_keeps_the_image_score_and_signal_is_used(name):
    kind = learner(name)
    X, y, fold, patients = _table(1200, seed=5, table_signal=0.0)
    stacked, alone, fits = cross_fit(kind, X, y, fold, patients, bags=3, seed=0, log=lambda m: None)
    assert auc(y, stacked) >= auc(y, X[:, -1]) - 0.005
    X, y, fold, patients = _table(1200, seed=6, table_signal=1.2)
    stacked, alone, fits = cross_fit(kind, X, y, fold, patients, bags=3, seed=0, log=lambda m: None)
    assert all(f.weight > 0 for f in fits) and auc(y, stacked) > auc(y, X[:, -1]) + 0.03


def test_a_two_fold_run_splits_its_training_patients_in_two_with_melanomas_in_both():
    from melafast.inference.stackfit import _inner_folds

    rng = np.random.default_rng(7)
    patients = rng.integers(0, 60, 300).astype(str)
    y = np.isin(patients, ["3", "17"]).astype(int)  # two patients hold every melanoma
    inner = _inner_folds(np.zeros(300), patients, y, seed=0)
    assert set(inner) == {0, 1} and all(len(set(inner[patients == p])) == 1 for p in set(patients))
    assert y[inner == 0].sum() > 0 and y[inner == 1].sum() > 0
