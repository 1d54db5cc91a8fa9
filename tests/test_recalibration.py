"""`melafast recalibrate`: a monotone map that makes probabilities mean what they say, fitted cross-fitted, saved in
the run and applied alike by predict, the library, serve and the ONNX runtime; rankings never change."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import invoke
from sklearn.metrics import roc_auc_score


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_an_overconfident_score_is_recalibrated_and_its_ranking_kept():
    from melafast.evaluate.recalibrate import crossfit_recalibration, fit_recalibration
    from melafast.metrics import calibration

    rng = np.random.default_rng(0)
    n = 4000
    true_logit = rng.normal(-1.5, 1.5, n)
    target = (rng.random(n) < _sigmoid(true_logit)).astype(int)
    pred = _sigmoid(2.0 * true_logit + 1.0)  # twice as sure as it should be, and shifted
    slope, shift = fit_recalibration(target, pred)
    assert slope == pytest.approx(0.5, abs=0.05) and shift == pytest.approx(-0.5, abs=0.1)
    parts = np.arange(n) % 5
    fixed = crossfit_recalibration(target, pred, parts)
    assert calibration(target, fixed)["ece"] < calibration(target, pred)["ece"] / 3
    # one map per part: within a part the ranking is the score's own
    for k in range(5):
        mine = parts == k
        assert roc_auc_score(target[mine], fixed[mine]) == pytest.approx(roc_auc_score(target[mine], pred[mine]))
    with pytest.raises(Exception, match="do not rank melanomas above"):
        fit_recalibration(target, 1 - pred)


@pytest.fixture
def recalibrated(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    res = invoke("recalibrate", "--run", run)
    assert res.exit_code == 0, res.output
    return run


def test_recalibrate_on_a_calibration_set_and_what_it_refuses(recalibrated, sample_dir, tmp_path):
    from melafast.data import make_sample

    cal = make_sample(tmp_path / "cal", n_train=60, n_test=1, seed=9, px=48)
    t = pd.read_csv(cal / "train.csv")
    for name in t["image_name"]:
        (cal / "jpeg" / "train" / f"{name}.jpg").rename(cal / "jpeg" / "train" / f"R_{name}.jpg")
    t.assign(image_name="R_" + t["image_name"], patient_id="R_" + t["patient_id"]).to_csv(cal / "train.csv", index=False)
    res = invoke("recalibrate", "--run", recalibrated, "--data", cal, "--workers", 0, "--folds", 3)
    assert res.exit_code == 0, res.output
    r = json.loads((recalibrated / "recalibration.json").read_text())
    assert r["source"] == "calibration set" and "scored as predict scores them" in r["fitted_on"]
    assert r["images"] <= 60  # look-alikes of training images are left out, and said
    few = tmp_path / "few"
    shutil.copytree(cal, few)
    t2 = pd.read_csv(few / "train.csv")
    t2.assign(target=(np.arange(len(t2)) < 3).astype(int)).to_csv(few / "train.csv", index=False)
    res = invoke("recalibrate", "--run", recalibrated, "--data", few, "--workers", 0)
    assert res.exit_code == 1 and "needs at least 10 melanomas" in res.stderr and res.stderr.count("\n") == 1
