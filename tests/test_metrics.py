"""The figures every table gives beside the ROC AUC: the partial AUC above 80% sensitivity (ISIC 2024's metric) and
the sensitivity at 90% specificity, checked against ROC curves worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from melafast.metrics import auc, pauc, sens_at_spec


def test_pauc_of_the_extreme_rankings():
    y = np.array([0, 0, 0, 1, 1])
    assert pauc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == pytest.approx(0.2)  # perfect: the whole 1 x 0.2 strip
    assert pauc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == pytest.approx(0.0)  # reversed: the curve only reaches 0.8 at FPR 1
    assert pauc(y, np.full(5, 0.5)) == pytest.approx(0.02)  # chance: the triangle of the diagonal above TPR 0.8
    assert np.isnan(pauc([1, 1], [0.2, 0.3])) and np.isnan(sens_at_spec([0, 0], [0.2, 0.3]))


def test_pauc_and_sensitivity_of_a_staircase_by_hand():
    # scores, highest first: M M M B M B M B B B  ->  ROC corners (0, .6) (.2, .6) (.2, .8) (.4, .8) (.4, 1) (1, 1)
    y = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 0])
    p = np.linspace(1, 0.1, 10)
    assert auc(y, p) == pytest.approx(0.2 * 0.6 + 0.2 * 0.8 + 0.6 * 1.0)
    assert pauc(y, p) == pytest.approx(0.6 * 0.2)  # only FPR 0.4 to 1 lies above TPR 0.8, 0.2 high
    assert pauc(y, p, min_tpr=0.5) == pytest.approx(0.2 * 0.1 + 0.2 * 0.3 + 0.6 * 0.5)
    assert sens_at_spec(y, p, 0.9) == pytest.approx(0.6)  # FPR <= 0.1: only the top three
    assert sens_at_spec(y, p, 0.8) == pytest.approx(0.8)


def test_pauc_cuts_a_sloped_segment_where_it_crosses_the_line():
    # M M M at the top, then a tie of 2 melanomas and 2 benign: the curve runs straight from (0, .6) to (.4, 1)
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.5, 0.3, 0.2, 0.1])
    # it crosses TPR 0.8 at FPR 0.2: a triangle (0.2 wide, 0.2 high) and then the 0.6 x 0.2 strip
    assert pauc(y, p) == pytest.approx(0.5 * 0.2 * 0.2 + 0.6 * 0.2)
    assert sens_at_spec(y, p, 0.9) == pytest.approx(0.6)  # the tie is one threshold: it takes all four or none


def test_pauc_is_the_isic_2024_scorer_and_not_sklearns_max_fpr():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 400)
        p = np.round(rng.random(400) + y * rng.random(), 2)  # rounded: many ties
        # the challenge's scorer: swap the classes, negate the scores, take sklearn's McClish-scaled pAUC at
        # FPR <= 0.2 and undo the scaling
        scaled = roc_auc_score(1 - y, -p, max_fpr=0.2)
        expected = 0.5 * 0.2**2 + (0.2 - 0.5 * 0.2**2) / 0.5 * (scaled - 0.5)
        assert pauc(y, p) == pytest.approx(expected, abs=1e-12)
        assert pauc(y, p ** 3) == pytest.approx(pauc(y, p))  # a ranking metric: any increasing map keeps it
        assert abs(pauc(y, p) - roc_auc_score(y, p, max_fpr=0.2)) > 0.3  # the other variant is another number


def test_weighted_pauc_is_the_pauc_of_the_resample_and_the_interval_holds_it():
    from melafast.metrics import bootstrap_pauc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + 0.7 * y, 2)
    w = rng.integers(0, 4, 200)
    rows = np.repeat(np.arange(200), w)
    assert pauc(y, p, weights=w) == pytest.approx(pauc(y[rows], p[rows]), abs=1e-12)
    assert sens_at_spec(y, p, 0.9, weights=w) == pytest.approx(sens_at_spec(y[rows], p[rows], 0.9), abs=1e-12)
    ci = bootstrap_pauc(y, p, groups=np.arange(200) // 4, n_boot=300)
    assert ci["pauc"] == pytest.approx(pauc(y, p)) and ci["n_boot"] == 300
    assert ci["lo"] < ci["pauc"] < ci["hi"]
    assert 0 <= ci["lo"] and ci["hi"] <= 0.2


def _challenge_top_n(target, pred, patients, n=15):
    "ISIC 2024's secondary metric as its organisers' script computes it: pandas nlargest per patient."
    df = pd.DataFrame({"target": target, "pred": pred, "patient_id": patients})
    top = df.groupby("patient_id", group_keys=False).apply(lambda x: x.nlargest(n, "pred"))
    return top["target"].sum() / df["target"].sum()


def test_top_15_sensitivity_matches_the_challenge_definition():
    from melafast.metrics import top_n_sensitivity

    # by hand: patient A has 20 lesions, its melanoma ranked 16th, missed; B's two melanomas in its top 15; C: 1 lesion
    pred_a = np.linspace(0.99, 0.01, 20)
    target_a = np.zeros(20, dtype=int)
    target_a[15] = 1
    target = np.r_[target_a, [1, 1, 0], [1]]
    pred = np.r_[pred_a, [0.2, 0.1, 0.3], [0.05]]
    patients = ["A"] * 20 + ["B"] * 3 + ["C"]
    assert top_n_sensitivity(target, pred, patients) == pytest.approx(3 / 4)
    assert top_n_sensitivity(target, pred, patients, n=16) == pytest.approx(1.0)
    # random patients, many tied scores: the organisers' pandas code agrees to the last digit
    rng = np.random.default_rng(0)
    n = 3000
    patients = rng.integers(0, 60, n).astype(str)
    pred = np.round(rng.random(n), 2)  # ties everywhere: kept in row order, as nlargest keeps them
    target = (rng.random(n) < 0.05).astype(int)
    for k in (1, 5, 15, 40):
        assert top_n_sensitivity(target, pred, patients, n=k) == pytest.approx(_challenge_top_n(target, pred, patients, k))
    # a resample of whole patients, given as row weights, equals the metric on the patients drawn, each copy of a
    # patient counted as a patient of its own
    draw = rng.choice(np.unique(patients), 60)
    w = pd.Series(patients).map(pd.Series(draw).value_counts()).fillna(0).to_numpy()
    rows, ids = [], []
    for copy, p in enumerate(draw):
        mine = np.flatnonzero(patients == p)
        rows += mine.tolist()
        ids += [f"{p}/{copy}"] * len(mine)
    rows = np.array(rows)
    assert top_n_sensitivity(target, pred, patients, 15, w) == pytest.approx(
        _challenge_top_n(target[rows], pred[rows], np.array(ids), 15))
    assert np.isnan(top_n_sensitivity(np.zeros(5), np.ones(5), list("abcde")))
