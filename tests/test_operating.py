"""Operating points: chosen on other folds (cross-fitted), scored with patient intervals, saved by `report
--operating-point`, and applied by `predict` / `load_predictor` as a decision column."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from melafast.cli import app
from melafast.errors import MelafastError
from melafast.evaluate.operating import (choose_threshold, crossfit_decisions, operating_table, parse_goal, ppv_npv,
                                         save_operating_point, vote)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# scores of 10 rows, 4 melanomas: sorted high to low the targets are 1 1 0 1 0 0 1 0 0 0
TARGET = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
PRED = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])


def test_thresholds_meet_their_goal_by_hand():
    # each threshold sits halfway between the score it keeps and the next lower one
    assert choose_threshold(TARGET, PRED, "sens75") == pytest.approx(0.55)  # 3 of 4 melanomas: keeps 0.6, not 0.5
    assert choose_threshold(TARGET, PRED, "sens90") == pytest.approx(0.25)  # all 4: keeps 0.3
    # specificity >= 80%: at most 1 of the 6 benign lesions at or above the cut; at 0.5 two are (0.7, 0.5): 4/6;
    # at 0.6 one is (0.7): 5/6, so the lowest cut that reaches it keeps 0.6
    assert choose_threshold(TARGET, PRED, "spec80") == pytest.approx(0.55)
    assert choose_threshold(TARGET, PRED, "0.35") == 0.35  # a fixed threshold stays as given
    assert choose_threshold(TARGET, PRED, "spec99.9") == pytest.approx(0.75)  # every benign lesion (0.7 the highest) below
    # when the highest score is a benign lesion's, only calling nothing reaches 100% specificity
    assert choose_threshold([0, 1, 1], [0.9, 0.5, 0.1], "spec99.9") == pytest.approx(0.95)
    assert choose_threshold([1, 0, 0], [0.9, 0.5, 0.1], "sens99") == pytest.approx(0.7)


def test_a_threshold_never_sits_on_a_score_so_a_last_digit_cannot_flip_a_decision():
    "A melanoma scored exactly at the threshold was lost by the ONNX runtime, 2e-7 lower: no threshold is a score."
    rng = np.random.default_rng(5)
    target = rng.integers(0, 2, 300)
    pred = np.round(rng.random(300) * 0.5 + 0.4 * target, 3)  # ties, as fp16 or rounded scores make them
    for goal in ("sens80", "sens90", "sens95", "spec80", "spec90", "spec95"):
        t = choose_threshold(target, pred, goal)
        assert not np.isclose(pred, t, rtol=0, atol=1e-5).any(), goal
        gap = np.abs(pred - t).min()
        # the same decisions for scores nudged by far less than the gap (another runtime's last digits)
        for nudge in (-1e-6, 1e-6):
            assert np.array_equal(pred >= t, pred + nudge >= t), goal
        assert gap > 1e-4, goal


def test_operating_point_names_are_checked():
    assert parse_goal("SENS90")["label"] == "sensitivity >= 90%" and parse_goal("spec97.5")["level"] == 0.975
    for bad in ("sens100", "sens9", "sensitivity", "1.5", "0", "spec"):
        with pytest.raises(MelafastError, match="unknown operating point"):
            parse_goal(bad)


def test_cross_fitting_never_chooses_a_fold_threshold_on_that_fold():
    rng = np.random.default_rng(0)
    n = 600
    fold = np.repeat([0, 1, 2], n // 3)
    target = (rng.random(n) < 0.2).astype(int)
    pred = rng.random(n) * 0.5 + 0.4 * target
    pred[fold == 2] += 0.3  # fold 2's model scores higher: its own rows would give it another threshold
    decision, thresholds = crossfit_decisions(target, pred, fold, "sens90")
    for k in (0, 1, 2):
        other = fold != k
        assert thresholds[k] == choose_threshold(target[other], pred[other], "sens90")
        assert np.array_equal(decision[fold == k], (pred[fold == k] >= thresholds[k]).astype(np.int8))
    assert thresholds[2] != choose_threshold(target[fold == 2], pred[fold == 2], "sens90")
    # in-sample the goal is met exactly; cross-fitted it is what a new fold gets (here fold 2 is over-called)
    in_sample = (pred >= choose_threshold(target, pred, "sens90"))[target == 1].mean()
    assert in_sample >= 0.9 and decision[target == 1].mean() != in_sample


def test_predictive_values_and_their_intervals():
    ppv, npv = ppv_npv(0.9, 0.8, 0.1)  # by hand: 0.09 / (0.09 + 0.18); 0.72 / (0.72 + 0.01)
    assert ppv == pytest.approx(0.09 / 0.27) and npv == pytest.approx(0.72 / 0.73)
    rng = np.random.default_rng(1)
    n = 800
    target = (rng.random(n) < 0.15).astype(int)
    pred = rng.random(n) * 0.6 + 0.35 * target
    fold, patients = rng.integers(0, 4, n), np.arange(n) // 2
    table = operating_table(target, pred, fold, patients, ["sens90", "spec95"], prevalence=0.02, n_boot=300)
    assert set(table["measure"]) == {"sensitivity", "specificity", "PPV", "NPV"}
    assert sorted(set(table["prevalence"].dropna())) == [0.02, pytest.approx(target.mean())]
    assert (table["lo"] <= table["cross-fitted"]).all() and (table["cross-fitted"] <= table["hi"]).all()
    sens = table[(table["operating point"] == "sens90") & (table["measure"] == "sensitivity")].iloc[0]
    decision, _ = crossfit_decisions(target, pred, fold, "sens90")
    assert sens["cross-fitted"] == pytest.approx(decision[target == 1].mean())
    assert sens["in-sample (optimistic)"] >= 0.9 and sens["hi"] - sens["lo"] > 0.02
    ppv2 = table[(table["operating point"] == "sens90") & (table["measure"] == "PPV") & (table["prevalence"] == 0.02)]
    spec = table[(table["operating point"] == "sens90") & (table["measure"] == "specificity")]["cross-fitted"].iloc[0]
    assert ppv2["cross-fitted"].iloc[0] == pytest.approx(ppv_npv(sens["cross-fitted"], spec, 0.02)[0])


def test_the_vote_of_fold_models():
    per_model = [[0.9, 0.2, 0.6, 0.1], [0.8, 0.6, 0.2, 0.1], [0.1, 0.7, 0.2, 0.1]]
    decision, votes = vote(per_model, 0.5)
    assert votes.tolist() == [2, 2, 1, 0] and decision.tolist() == [1, 1, 0, 0]
    decision, votes = vote(per_model[:2], 0.5)  # two models: a tie counts as melanoma
    assert decision.tolist() == [1, 1, 1, 0]


@pytest.fixture
def run(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def test_report_saves_the_operating_point_and_predict_decides_with_it(run, sample_dir, tmp_path):
    from melafast.inference import load_predictor

    res = invoke("predict", "--run", run, "--images", sample_dir / "jpeg" / "test", "--workers", 0, "--out",
                 tmp_path / "plain.csv")
    assert res.exit_code == 0 and "decision" not in pd.read_csv(tmp_path / "plain.csv").columns  # none saved yet
    res = invoke("report", "--run", run, "--workers", 0, "--bootstrap", 100, "--errors", 0, "--no-importance",
                 "--no-audit", "--operating-point", "sens90", "--prevalence", 0.02)
    assert res.exit_code == 0, res.output
    point = json.loads((run / "threshold.json").read_text())
    oof = pd.read_csv(run / "oof.csv")
    assert point["threshold"] == choose_threshold(oof["target"], oof["pred"], "sens90")
    assert point["operating_point"] == "sens90" and point["n_models"] == 2 and point["tta"] == 1
    decision, _ = crossfit_decisions(oof["target"], oof["pred"], oof["fold"], "sens90")
    assert point["crossfit"]["sensitivity"]["value"] == pytest.approx(decision[oof["target"] == 1].mean())
    assert [p["prevalence"] for p in point["crossfit"]["predictive"]] == [pytest.approx(oof["target"].mean()), 0.02]
    assert "Operating point in force: sensitivity &gt;= 90%" in (run / "report.html").read_text()

    res = invoke("predict", "--run", run, "--images", sample_dir / "jpeg" / "test", "--workers", 0, "--out",
                 tmp_path / "preds.csv")
    assert res.exit_code == 0 and "operating point sens90" in res.output
    got = pd.read_csv(tmp_path / "preds.csv")
    predictor = load_predictor(run)
    frame = predictor.predict_frame(sample_dir / "jpeg" / "test", progress=False)
    per_model = [p.predict(sample_dir / "jpeg" / "test", progress=False) for p in predictor.predictors]
    want, votes = vote(per_model, point["threshold"])
    assert frame["decision"].tolist() == want.tolist() == got["decision"].tolist()
    assert frame["votes"].tolist() == votes.tolist() == got["votes"].tolist()
    assert ((2 * got["votes"] >= len(per_model)) == (got["decision"] == 1)).all()  # the votes are the reason given
    assert np.allclose(frame["pred"], got["pred"]) and np.allclose(got["pred"], np.mean(per_model, axis=0))
    with pytest.warns(UserWarning, match="TTA x2"):  # another TTA than the one that chose the threshold: said
        predictor.predict_frame(sample_dir / "jpeg" / "test", tta=2, progress=False)


def test_save_operating_point_from_the_library_and_bad_input(run):
    point = save_operating_point(run, "spec95", n_boot=50)
    assert point.goal == "specificity >= 95%" and (run / "threshold.json").is_file()
    for args, msg in ((["--operating-point", "sens101"], "unknown operating point 'sens101'"),
                      (["--operating-point", "best"], "unknown operating point 'best'"),
                      (["--prevalence", "1.5"], "--prevalence must be between 0 and 1")):
        res = invoke("report", "--run", run, "--no-audit", "--errors", 0, *args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and msg in res.stderr, res.output
    (run / "oof.csv").unlink()
    with pytest.raises(MelafastError, match="has no oof.csv"):
        save_operating_point(run, "sens90")


def test_a_one_fold_run_gets_in_sample_figures_only(make_run, tmp_path, sample_dir):
    run = shutil.copytree(make_run(extra_meta=True, fold=0), tmp_path / "run")
    res = invoke("report", "--run", run, "--workers", 0, "--bootstrap", 50, "--errors", 0, "--no-importance",
                 "--no-audit", "--operating-point", "spec90")
    assert res.exit_code == 0, res.output
    assert "no cross-fitted figures" in (run / "report.html").read_text()
    point = json.loads((run / "threshold.json").read_text())  # valid JSON: no NaN
    assert point["crossfit"]["sensitivity"] is None and point["in_sample"]["specificity"] >= 0.9
    res = invoke("predict", "--run", run, "--images", sample_dir / "jpeg" / "test", "--workers", 0, "--out",
                 tmp_path / "p.csv")
    assert res.exit_code == 0 and "not cross-fitted (one fold)" in res.output


def test_decide_by_the_saved_points_scale():
    from melafast.evaluate.operating import decide

    per_model = [[0.9, 0.45, 0.30, 0.1], [0.2, 0.45, 0.32, 0.1], [0.2, 0.45, 0.33, 0.1]]
    # chosen on out-of-fold scores: each model against the threshold, then the vote
    assert decide({"threshold": 0.31}, per_model)[0].tolist() == [0, 1, 1, 0]
    # chosen on a calibration set, on the fold mean: the mean against the threshold (0.433, 0.45, 0.317, 0.1)
    decision, votes = decide({"threshold": 0.32, "scale": "ensemble"}, per_model)
    assert decision.tolist() == [1, 1, 0, 0] and votes.tolist() == [1, 3, 2, 0]


N_CAL = 80  # calibration images


@pytest.fixture
def calibration_dir(tmp_path, sample_dir):
    """Labelled images of other patients than the sample's (a sample of another seed, renamed), without the drawn
    lesions that look like a training image to the perceptual hash (calibrate would leave those out, and say so)."""
    from conftest import without_lookalikes

    from melafast.data import make_sample

    src = make_sample(tmp_path / "cal", n_train=N_CAL + 20, n_test=4, seed=7, px=48)
    t = pd.read_csv(src / "train.csv")
    for name in t["image_name"]:
        (src / "jpeg" / "train" / f"{name}.jpg").rename(src / "jpeg" / "train" / f"CAL_{name}.jpg")
    t["image_name"], t["patient_id"] = "CAL_" + t["image_name"], "CAL_" + t["patient_id"]
    t = without_lookalikes(t, src / "jpeg" / "train", sample_dir).head(N_CAL)
    t.to_csv(src / "train.csv", index=False)
    assert len(t) == N_CAL and t["target"].sum() >= 10
    return src


def test_calibrate_chooses_on_predicts_scale_and_predict_decides_by_the_mean(run, calibration_dir, sample_dir,
                                                                             tmp_path):
    from melafast.data import load_competition, make_folds
    from melafast.inference import load_predictor
    from melafast.inference.loop import predict_many

    res = invoke("calibrate", "--run", run, "--data", calibration_dir, "--operating-point", "sens90", "--bootstrap",
                 100, "--workers", 0)
    assert res.exit_code == 0, res.output
    point = json.loads((run / "threshold.json").read_text())
    assert point["scale"] == "ensemble" and point["calibration"]["images"] == 80
    cal, _ = load_competition(calibration_dir)
    predictor = load_predictor(run)
    per_model = predict_many(predictor.predictors, cal, tta=predictor.tta, num_workers=0, progress=False)
    mean, target = np.mean(per_model, axis=0), cal["target"].to_numpy()
    # the threshold is chosen on the fold mean of the calibration images, as predict scores them
    assert point["threshold"] == pytest.approx(choose_threshold(target, mean, "sens90"))
    assert (mean[target == 1] >= point["threshold"]).mean() >= 0.9
    parts = make_folds(cal, n_folds=5, seed=0)["fold"]
    decision, _ = crossfit_decisions(target, mean, parts, "sens90")
    assert point["crossfit"]["sensitivity"]["value"] == pytest.approx(decision[target == 1].mean())
    # predict decides by the fold mean against it, and prints no votes that could contradict that decision
    res = invoke("predict", "--run", run, "--images", sample_dir / "jpeg" / "test", "--workers", 0, "--out",
                 tmp_path / "preds.csv")
    assert res.exit_code == 0 and "fold models' mean probability" in res.output, res.output
    got = pd.read_csv(tmp_path / "preds.csv")
    assert got["decision"].tolist() == (got["pred"] >= point["threshold"]).astype(int).tolist()
    assert "votes" not in got.columns
    assert "chosen on a calibration set of 80 images" in res.output and "each part of the calibration set" in res.output
    assert "out-of-fold images" not in res.output.split("decision (1: melanoma)")[1].splitlines()[0]
    frame = load_predictor(run).predict_frame(sample_dir / "jpeg" / "test", num_workers=0, progress=False)
    assert "votes" not in frame.columns and frame["decision"].tolist() == got["decision"].tolist()


def test_a_calibrated_point_is_never_replaced_without_replace_and_the_report_shows_the_point_in_force(
        run, calibration_dir):
    assert invoke("calibrate", "--run", run, "--data", calibration_dir, "--bootstrap", 50, "--workers", 0).exit_code == 0
    calibrated = (run / "threshold.json").read_text()
    point = json.loads(calibrated)
    # a plain report shows the point predict decides by: where it was chosen, its rule
    res = invoke("report", "--run", run, "--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance",
                 "--no-audit")
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert 'id="point-in-force"' in page and "Operating point in force" in page
    assert f"Threshold {point['threshold']:.4f}" in page and "a calibration set of 80 images" in page
    assert (run / "threshold.json").read_text() == calibrated  # reading is not choosing
    # choosing on the out-of-fold rows would replace it: refused, naming the point that is there, before any work
    for args in (["report", "--run", run, "--operating-point", "sens90", "--workers", 0, "--no-audit"],
                 ["calibrate", "--run", run, "--data", calibration_dir, "--workers", 0]):
        res = invoke(*args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
        assert "already has a calibrated operating point, sens90 (threshold" in res.stderr and "--replace" in res.stderr
        assert (run / "threshold.json").read_text() == calibrated
    res = invoke("report", "--run", run, "--operating-point", "spec95", "--workers", 0, "--bootstrap", 20, "--errors", 0,
                 "--no-importance", "--no-audit", "--replace")
    assert res.exit_code == 0 and f"replacing the operating point sens90 (threshold {point['threshold']:.4f}" in res.output
    assert json.loads((run / "threshold.json").read_text())["operating_point"] == "spec95"


def test_operating_point_is_its_own_step_and_chooses_what_the_report_would(run, tmp_path):
    res = invoke("operating-point", "--run", run, "--goal", "spec95", "--bootstrap", 50)
    assert res.exit_code == 0, res.output
    point = json.loads((run / "threshold.json").read_text())
    oof = pd.read_csv(run / "oof.csv")
    assert point["operating_point"] == "spec95" and point["threshold"] == choose_threshold(oof["target"], oof["pred"],
                                                                                           "spec95")
    assert f"threshold {point['threshold']:.4f}" in res.output and "out-of-fold images" in res.output
    assert not (run / "report.html").exists()  # choosing writes the point only
    other = shutil.copytree(run, tmp_path / "other")
    (other / "threshold.json").unlink()
    assert invoke("report", "--run", other, "--operating-point", "spec95", "--bootstrap", 50, "--workers", 0,
                  "--errors", 0, "--no-importance", "--no-audit").exit_code == 0
    assert json.loads((other / "threshold.json").read_text())["threshold"] == point["threshold"]


def test_the_point_says_how_it_does_for_images_with_and_without_metadata(run, sample_dir, calibration_dir, tmp_path):
    "The threshold is chosen on images with metadata; what it reaches on images without is measured, not assumed."
    assert invoke("operating-point", "--run", run, "--goal", "sens90", "--bootstrap", 50).exit_code == 0
    point = json.loads((run / "threshold.json").read_text())
    oof = pd.read_csv(run / "oof.csv")
    target, fold = oof["target"].to_numpy(), oof["fold"].to_numpy()
    given, per_fold = crossfit_decisions(target, oof["pred"], fold, "sens90")
    without = (oof["pred_no_meta"].to_numpy() >= np.array([per_fold[k] for k in fold])).astype(int)
    paths = point["paths"]
    assert paths["as given"]["sensitivity"]["value"] == pytest.approx(given[target == 1].mean())
    assert paths["as given"]["sensitivity"]["value"] == pytest.approx(point["crossfit"]["sensitivity"]["value"])
    assert paths["no metadata"]["sensitivity"]["value"] == pytest.approx(without[target == 1].mean())
    assert paths["no metadata"]["specificity"]["value"] == pytest.approx(1 - without[target == 0].mean())
    assert paths["no metadata"]["sensitivity"]["lo"] <= paths["no metadata"]["sensitivity"]["value"]
    said = f"without metadata) reach sensitivity {paths['no metadata']['sensitivity']['value']:.3f}"
    res = invoke("predict", "--run", run, "--images", sample_dir / "jpeg" / "test", "--workers", 0, "--out",
                 tmp_path / "p.csv")
    assert res.exit_code == 0 and said in " ".join(res.output.split()), res.output
    invoke("report", "--run", run, "--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance", "--no-audit")
    assert said in (run / "report.html").read_text()
    invoke("card", "--run", run, "--bootstrap", 20)
    assert said in " ".join((run / "MODEL_CARD.md").read_text().split())
    # a calibrated point measures both paths on its calibration set, from the same pass over the images
    res = invoke("calibrate", "--run", run, "--data", calibration_dir, "--bootstrap", 50, "--workers", 0, "--replace")
    assert res.exit_code == 0, res.output
    cal = json.loads((run / "threshold.json").read_text())
    assert cal["scale"] == "ensemble" and set(cal["paths"]) == {"as given", "no metadata"}


def test_calibrate_refuses_what_cannot_calibrate(run, sample_dir, calibration_dir):
    cases = [(["--data", sample_dir], "the same image name as a training image"),
             (["--data", calibration_dir, "--operating-point", "0.3"], "needs no calibration set"),
             (["--data", calibration_dir, "--operating-point", "sens101"], "unknown operating point 'sens101'")]
    t = pd.read_csv(calibration_dir / "train.csv")
    few = calibration_dir.parent / "few"
    shutil.copytree(calibration_dir, few)
    t[(t["target"] == 0) | (t.index < 30)].head(40).assign(target=lambda d: (d.index < 3).astype(int)).to_csv(
        few / "train.csv", index=False)
    cases.append((["--data", few], "it needs at least 10 melanomas"))
    shared = calibration_dir.parent / "shared_patient"
    shutil.copytree(calibration_dir, shared)
    train = pd.read_csv(sample_dir / "train.csv")
    t.assign(patient_id=train["patient_id"].iloc[0]).to_csv(shared / "train.csv", index=False)
    cases.append((["--data", shared], "a patient of the run's training table"))
    for args, msg in cases:
        res = invoke("calibrate", "--run", run, "--workers", 0, *args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and msg in res.stderr, (args, res.output)
    assert not (run / "threshold.json").exists()


def test_the_report_gives_one_row_per_operating_point():
    "Four points were 24 rows (one per measure); now one row each, every measure with its interval beside it."
    from melafast.evaluate.report import point_rows

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) + 0.6 * y
    table = operating_table(y, p, np.arange(300) % 3, None, ["sens90", "sens95", "spec90", "spec95"], 0.02, 50)
    rows = point_rows(table)
    assert rows["operating point"].tolist() == ["sens90", "sens95", "spec90", "spec95"]
    first = table[table["operating point"] == "sens90"].set_index(["measure", "prevalence"], drop=False)
    sens = table[(table["operating point"] == "sens90") & (table["measure"] == "sensitivity")].iloc[0]
    assert rows.loc[0, "sensitivity"] == f"{sens['cross-fitted']:.3f} ({sens['lo']:.3f} to {sens['hi']:.3f})"
    assert {"PPV at 2.0%", "NPV at 2.0%", "in-sample sensitivity (optimistic)"} <= set(rows.columns)
    assert len(first) == 6  # sensitivity, specificity, PPV and NPV at the data's prevalence and at 2%


def test_the_report_says_which_diagnoses_the_point_calls_melanoma():
    from melafast.evaluate.operating import calls_by_diagnosis
    from melafast.evaluate.report import _by_diagnosis
    from melafast.record import OperatingPoint

    rng = np.random.default_rng(2)
    n = 300
    diagnosis = rng.choice(["nevus", "seborrheic keratosis", "melanoma"], n, p=[0.5, 0.3, 0.2])
    target = (diagnosis == "melanoma").astype(int)
    pred = rng.random(n) * 0.5 + 0.4 * target + 0.25 * (diagnosis == "seborrheic keratosis")  # keratoses look worse
    df = pd.DataFrame(dict(target=target, pred=pred, fold=np.arange(n) % 3, diagnosis=diagnosis))
    html = _by_diagnosis(calls_by_diagnosis(df, OperatingPoint(threshold=0.5, operating_point="sens90")))
    decision, _ = crossfit_decisions(target, pred, df["fold"], "sens90")
    for d in ("nevus", "seborrheic keratosis", "melanoma"):
        share = decision[diagnosis == d].mean()
        assert f"<td>{d}</td>" in html and f"{share:.3f}" in html, d
    assert decision[diagnosis == "seborrheic keratosis"].mean() > decision[diagnosis == "nevus"].mean()
    assert calls_by_diagnosis(df.drop(columns="diagnosis"), OperatingPoint(threshold=0.5)) is None
    assert _by_diagnosis(None) == ""
