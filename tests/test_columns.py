"""Metadata columns as a fastai user declares them (`--cat`, `--cont`, `melanoma_dls(cat_names=, cont_names=)`):
checked against the tables, never the label or a column test.csv lacks, saved with the model, used by predict."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, _cli_args, _once
from typer.testing import CliRunner

from melafast.cli import app
from melafast.errors import DataError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def wide_data(shared_root):
    "The sample with three more columns: a measurement (with holes), a category, and one that test.csv lacks."
    from melafast.data import make_sample

    def make(path):
        make_sample(path, n_train=64, n_test=16, seed=1, px=64)
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            t = pd.read_csv(path / f"{split}.csv").astype(object)
            t["lesion_size_mm"] = np.round(rng.uniform(2, 12, len(t)), 1).astype(object)
            t.loc[::7, "lesion_size_mm"] = ""
            t["skin_tone"] = rng.choice(["I", "II", "III", "unknown"], len(t))
            t["diagnosis"] = np.where(t.get("target", 0) == 1, "melanoma", "nevus")
            if split == "train":
                t["train_only"] = rng.random(len(t))
            t.to_csv(path / f"{split}.csv", index=False)

    return _once(shared_root, "wide-data", make)


COLUMNS = ["--cat", "sex", "--cat", "skin_tone", "--cont", "age_approx", "--cont", "lesion_size_mm", "--cont",
           "train_only"]


def test_declared_columns_train_and_predict(wide_data, tmp_path):
    from melafast.inference import load_predictor

    res = invoke(*_cli_args({"data": wide_data, **TINY, "out": tmp_path / "run"}), *COLUMNS)
    assert res.exit_code == 0, res.output
    assert res.output.count("train_only are in train.csv but not in test.csv: never a feature") == 1
    fold = json.loads((tmp_path / "run" / "fold0" / "config.json").read_text())
    proc = fold["meta_proc"]
    assert proc["cat_names"] == ["sex", "skin_tone"] and proc["cont_names"] == ["age_approx", "lesion_size_mm"]
    assert proc["vocab"]["skin_tone"] == ["i", "ii", "iii"]  # "unknown" is a hole, not a category
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["cat"] == ["sex", "skin_tone"] and settings["cont"] == ["age_approx", "lesion_size_mm"]
    predictor = load_predictor(tmp_path / "run")
    n_meta = predictor.predictors[0].model.meta_mlp[0].in_features  # the MLP sized from the columns
    assert n_meta == 2 * 2 + (2 + 2) + (3 + 2)
    # the measurement reaches the model: other sizes, other probabilities
    test = pd.read_csv(wide_data / "test.csv")
    images = [wide_data / "jpeg" / "test" / f"{n}.jpg" for n in test["image_name"]]
    a = predictor.predict(images, meta=test, progress=False)
    b = predictor.predict(images, meta=test.assign(lesion_size_mm=30.0), progress=False)
    assert np.abs(a - b).max() > 1e-4
    res = invoke("predict", "--run", tmp_path / "run", "--data", wide_data, "--workers", 0, "--out", tmp_path / "p.csv")
    assert res.exit_code == 0 and np.allclose(pd.read_csv(tmp_path / "p.csv")["pred"], a, atol=1e-6)
    res = invoke("report", "--run", tmp_path / "run", "--workers", 0, "--bootstrap", 50, "--errors", 0, "--no-audit")
    assert res.exit_code == 0 and "categorical sex, skin_tone; continuous age_approx, lesion_size_mm" in \
        (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["--cont", "diagnosis"], "'diagnosis' is the label or derived from it"),
    (["--cat", "iddx_full"], "'iddx_full' is the label or derived from it"),
    (["--cat", "patient_id"], "identifies an image or a patient"),
    (["--cont", "no_such_column"], "'no_such_column' not in train.csv"),
    (["--cont", "sex"], "sex holds categories, not numbers: declare it with --cat"),
    (["--cont", "skin_tone"], "skin_tone"),  # words in a continuous column
])
def test_bad_columns_are_one_error_line(wide_data, tmp_path, args, message):
    res = invoke("train", "--data", wide_data, "--size", 32, "--epochs", 1, "--no-pretrained", "--workers", 0,
                 "--out", tmp_path / "r", *args)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and message in res.stderr, res.output


def test_melanoma_dls_takes_cat_and_cont_names(wide_data):
    from melafast.data import load_competition, make_folds, melanoma_dls

    train, _ = load_competition(wide_data)
    df = make_folds(train, n_folds=2, seed=0)
    dls = melanoma_dls(df, fold=0, size=32, bs=8, num_workers=0, cat_names=["skin_tone"], cont_names=["lesion_size_mm"])
    assert dls.meta_proc.cat_names == ["skin_tone"] and dls.meta_proc.cont_names == ["lesion_size_mm"]
    x = dls.one_batch()[1]
    assert x.shape[1] == dls.meta_proc.n_features == 2 + (3 + 2)
    with pytest.raises(DataError, match="label"):
        melanoma_dls(df, fold=0, size=32, bs=8, num_workers=0, cont_names=["target"])


def test_categories_read_the_same_however_the_table_stored_them():
    from melafast.data import clean_columns
    from melafast.onnx import _Meta

    df = pd.DataFrame({"fitzpatrick": [1, 2, np.nan, "3.0", " II ", "unknown", 2.5], "size": ["4", "", "n/a", 5, 6, 7, 8]})
    got = clean_columns(df, ["fitzpatrick"], ["size"])
    assert got["fitzpatrick"].tolist()[:2] == ["1", "2"] and got["fitzpatrick"].tolist()[3:5] == ["3", "ii"]
    assert got["fitzpatrick"].isna().tolist() == [False, False, True, False, False, True, False]
    assert got["size"].tolist()[0] == 4.0 and got["size"].isna().sum() == 2
    # the exported runtime reads a CSV's text the same way
    meta = _Meta(dict(cat_names=["fitzpatrick"], cont_names=[], vocab={"fitzpatrick": ["1", "2", "3"]}, means={},
                      stds={}), dict(holes=["", "unknown", "n/a"], sexes={}))
    assert [meta._value("fitzpatrick", v) for v in ("3.0", "3", "II", "")] == ["3", "3", "ii", None]
