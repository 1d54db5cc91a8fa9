"""The ISIC 2024 layout end to end on its synthetic sample: metadata CSVs keyed by isic_id, HDF5 image stores,
2024 columns declared as features, train-only columns never features, a submission of isic_id,target."""

import json
import shutil

import pandas as pd
import pytest
from conftest import invoke


def test_the_2024_sample_has_the_2024_layout(sample_2024):
    import h5py

    train, test = pd.read_csv(sample_2024 / "train-metadata.csv"), pd.read_csv(sample_2024 / "test-metadata.csv")
    assert "isic_id" in train.columns and "image_name" not in train.columns
    assert {"iddx_full", "lesion_id", "tbp_lv_dnn_lesion_confidence", "target"} <= set(train.columns) - set(test.columns)
    assert train.groupby("patient_id").size().max() > 3 and 0 < train["target"].mean() < 0.1
    with h5py.File(sample_2024 / "train-image.hdf5") as f:
        assert set(f.keys()) == set(train["isic_id"]) and f[train["isic_id"].iloc[0]][()].tobytes()[:2] == b"\xff\xd8"
    assert list(pd.read_csv(sample_2024 / "sample_submission.csv").columns) == ["isic_id", "target"]


def test_train_and_submit_on_the_2024_layout(sample_2024, run_2024, tmp_path):
    run, output = run_2024
    assert "tbp_lv_dnn_lesion_confidence are in train.csv but not in test.csv: never a feature" in output
    assert "pAUC>80%TPR" in output and "top-15 sens" in output  # the 2024 metrics beside the AUC
    # the secondary metric, in results.json, from the OOF rows and each one's patient
    from melafast.metrics import top_n_sensitivity

    oof = pd.read_csv(run / "oof.csv").merge(pd.read_csv(sample_2024 / "train-metadata.csv")[["isic_id", "patient_id"]],
                                             left_on="image_name", right_on="isic_id")
    got = json.loads((run / "results.json").read_text())["headline"]["top15_sens"]
    assert got == pytest.approx(top_n_sensitivity(oof["target"], oof["pred"], oof["patient_id"]))
    res = invoke("submit", "--run", run, "--workers", 0, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["isic_id", "target"]
    assert sub["isic_id"].tolist() == pd.read_csv(sample_2024 / "sample_submission.csv")["isic_id"].tolist()
    res = invoke("train", "--data", sample_2024, "--size", 32, "--epochs", 1, "--no-pretrained", "--out",
                 tmp_path / "x", "--cont", "mel_thick_mm")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "'mel_thick_mm' is the label" in res.stderr


def test_patient_features_by_hand():
    import numpy as np

    from melafast.data import add_patient_features

    df = pd.DataFrame({"patient_id": ["a", "a", "a", "b", None, "c", "c"],
                       "size": [1.0, 2.0, 6.0, 5.0, 4.0, 3.0, np.nan]})
    got = add_patient_features(df, ["size"])
    z_a = (np.array([1.0, 2.0, 6.0]) - 3.0) / np.std([1.0, 2.0, 6.0])
    assert np.allclose(got["size_patient_z"].iloc[:3], z_a)
    assert got["size_patient_rank"].iloc[:3].tolist() == [0.0, 0.5, 1.0]
    # a patient's only lesion, a row without a patient, and a patient whose other lesion has no value: neutral
    assert got["size_patient_z"].iloc[3:6].tolist() == [0.0, 0.0, 0.0]
    assert got["size_patient_rank"].iloc[3:6].tolist() == [0.5, 0.5, 0.5]
    assert got[["size_patient_z", "size_patient_rank"]].iloc[6].isna().all()  # a missing value stays missing
    assert "target" not in got.columns and len(got) == len(df)


def test_patient_features_train_predict_and_are_not_exported(run_2024_patient, tmp_path):
    import json

    run = shutil.copytree(run_2024_patient[0], tmp_path / "run")
    proc = json.loads((run / "fold0" / "config.json").read_text())["meta_proc"]
    assert proc["cont_names"] == ["clin_size_long_diam_mm", "clin_size_long_diam_mm_patient_z",
                                  "clin_size_long_diam_mm_patient_rank"]
    res = invoke("submit", "--run", run, "--workers", 0, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 0, res.output  # predict computes them over the test table, as training did
    res = invoke("export", "--run", run, "--out", tmp_path / "onnx")
    assert res.exit_code == 1 and "--patient-features" in res.stderr
    shutil.rmtree(run / "fold1")  # an interrupted run resumes with the columns it recorded
    res = invoke("train", "--resume", run)
    assert res.exit_code == 0 and "fold(s) 0 already finished" in res.output, res.output


def test_stack_saves_its_models_and_submit_refits_nothing(sample_2024, run_2024, tmp_path, monkeypatch):
    import json

    import numpy as np

    from melafast.inference import learners
    from melafast.inference.stackfit import combine, scaled

    run = shutil.copytree(run_2024[0], tmp_path / "run")  # the stack writes into it
    res = invoke("stack", "--run", run, "--cont", "clin_size_long_diam_mm", "--cont", "tbp_lv_norm_border",
                 "--cont", "tbp_lv_dnn_lesion_confidence", "--bootstrap", 100)
    assert res.exit_code == 0, res.output
    assert "tbp_lv_dnn_lesion_confidence are in train.csv but not in test.csv" in res.output
    spec = json.loads((run / "stack.json").read_text())
    assert spec["columns"] == {"cat": [], "cont": ["clin_size_long_diam_mm", "tbp_lv_norm_border"]}
    assert f"image {spec['image_auc']:.4f}  stacked {spec['stack_auc']:.4f}" in res.output
    assert f"top-15 sensitivity     image {spec['image_top15']:.4f}" in res.output  # the 2024 metric, per patient
    said = dict(nothing="the table adds nothing here", helps="the table helps", unclear="adds nothing measurable",
                costs="the stack costs AUC here")
    assert said[spec["verdict"]] in res.output and sum(v in res.output for v in said.values()) == 1
    # the saved models, loaded from their text, give the stack's out-of-fold predictions: fold k's on fold k's rows
    oof = pd.read_csv(run / "stack_oof.csv")
    table = pd.read_csv(sample_2024 / "train-metadata.csv").set_index("isic_id")
    kind = learners.learner("trees")
    a, b = spec["calibration"]
    for f in spec["folds"]:
        rows = oof[oof["fold"] == f["fold"]]
        z = scaled(rows["pred_image"], f["scale"])
        assert np.allclose(z, rows["image_z"])
        X = np.c_[table.loc[rows["image_name"], ["clin_size_long_diam_mm", "tbp_lv_norm_border"]].to_numpy(), z]
        models = [kind.load((run / m["file"]).read_text()) for m in f["models"]]
        assert len(models) == 5 and all(json.loads((run / m["file"]).read_text()) for m in f["models"])
        margin = np.mean([kind.margin(m, X, f["rounds"]) for m in models], axis=0)
        s = combine(z, margin, f["calibration"], f["weight"], f["stacked_scale"])
        assert np.allclose(1 / (1 + np.exp(-(a + b * s))), rows["pred_stack"], atol=1e-9)
    # submit --stack loads them: nothing is fitted, and the training table is not needed
    monkeypatch.setattr(learners.SklearnTrees, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fit")))
    data = shutil.copytree(sample_2024, tmp_path / "data")
    (data / "train-metadata.csv").unlink()
    res = invoke("submit", "--run", run, "--stack", "--data", data, "--workers", 0, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["isic_id", "target"] and sub["target"].between(0, 1).all()
    assert sub["target"].nunique() > 1
    # a model file changed, the out-of-fold rows changed, a stack of an older melafast: one line each
    model_file = run / spec["folds"][0]["models"][0]["file"]
    saved = model_file.read_text()
    model_file.write_text(saved.replace('"baseline": ', '"baseline": 1'))
    res = invoke("submit", "--run", run, "--stack", "--workers", 0, "--out", tmp_path / "sub2.csv")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "checksum differs" in res.stderr, res.output
    model_file.write_text(saved)
    oof_rows = pd.read_csv(run / "oof.csv")
    oof_rows.assign(pred=oof_rows["pred"] * 0.9).to_csv(run / "oof.csv", index=False)
    res = invoke("submit", "--run", run, "--stack", "--workers", 0, "--out", tmp_path / "sub2.csv")
    assert res.exit_code == 1 and "changed since `melafast stack`" in res.stderr
    (run / "stack.json").write_text(json.dumps({**spec, "format": 1}))
    res = invoke("submit", "--run", run, "--stack", "--workers", 0, "--out", tmp_path / "sub2.csv")
    assert res.exit_code == 1 and "older melafast" in res.stderr
    res = invoke("stack", "--run", run, "--cont", "iddx_1")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "label" in res.stderr
    oof_rows[oof_rows["fold"] == 0].to_csv(run / "oof.csv", index=False)  # one fold finished: nothing to cross-fit
    res = invoke("stack", "--run", run, "--cont", "clin_size_long_diam_mm")
    assert res.exit_code == 1 and "come from fold 0 alone" in res.stderr, res.output


def test_submit_stack_fails_before_scoring_an_image(sample_2024, run_2024, tmp_path, monkeypatch):
    "A run without stack.json, or a data folder without the test table, is refused before any model runs."
    from melafast.inference import loop

    def no_scoring(*args, **kwargs):
        raise AssertionError("an image was scored before the stack's checks")

    monkeypatch.setattr(loop, "predict_probs_multi", no_scoring)
    run = run_2024[0]
    res = invoke("submit", "--run", run, "--stack", "--workers", 0, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "has no stack.json" in res.stderr, res.output
    stacked = shutil.copytree(run, tmp_path / "run")
    assert invoke("stack", "--run", stacked, "--cont", "clin_size_long_diam_mm", "--bootstrap", 20).exit_code == 0
    no_test = shutil.copytree(sample_2024, tmp_path / "data")
    (no_test / "test-metadata.csv").unlink()
    res = invoke("submit", "--run", stacked, "--stack", "--data", no_test, "--workers", 0, "--out", tmp_path / "s.csv")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "has no test.csv (nor test-metadata.csv)" in res.stderr, res.output
