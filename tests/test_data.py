import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HAM, ISIC_META, needs_ham, needs_isic_meta

from melafast.data import (MetaProcessor, clean_metadata, load_competition, make_folds, melanoma_dls, read_table,
                           inference_dl)
from melafast.errors import DataError


# ---- folds on the real competition table

@pytest.fixture(scope="module")
def isic_table():
    return clean_metadata(read_table(ISIC_META, required=("image_name", "target")))


@needs_isic_meta
def test_folds_real_table_grouped_and_stratified(isic_table):
    df = make_folds(isic_table, n_folds=5, seed=42)
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    assert df.groupby("patient_id")["fold"].nunique().max() == 1
    overall = df["target"].mean()
    assert abs(overall - 0.0176) < 0.0005
    rates = df.groupby("fold")["target"].mean()
    assert (rates - overall).abs().max() < 0.003, rates


@needs_isic_meta
def test_folds_deterministic_for_a_seed(isic_table):
    a = make_folds(isic_table, 5, seed=7)["fold"]
    b = make_folds(isic_table, 5, seed=7)["fold"]
    c = make_folds(isic_table, 5, seed=8)["fold"]
    assert a.equals(b)
    assert not a.equals(c)


def test_folds_rows_without_patient_are_their_own_groups():
    df = pd.DataFrame({"image_name": [f"i{i}" for i in range(40)], "patient_id": [np.nan] * 30 + ["p1"] * 10,
                       "target": [0, 1] * 20})
    f = make_folds(df, n_folds=4, seed=0)
    assert f.loc[30:, "fold"].nunique() == 1  # one patient, one fold
    assert f.loc[:29, "fold"].nunique() == 4  # id-less rows spread over every fold
    with pytest.raises(DataError, match="at least 5 patients"):
        make_folds(df.iloc[30:], n_folds=5)


def test_folds_by_institution_keep_each_institution_and_each_patient_whole():
    "--group-by attribution: an institution is held out whole; a patient seen at two is kept with both."
    from melafast.data.folds import fold_groups

    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"image_name": [f"i{i}" for i in range(n)], "patient_id": [f"p{i // 4}" for i in range(n)],
                       "attribution": np.repeat(rng.choice(["vienna", "queensland", "barcelona", "milan", "sydney"],
                                                           n // 4), 4),
                       "target": rng.integers(0, 2, n)})
    df.loc[df["patient_id"] == "p0", "attribution"] = ["vienna", "vienna", "milan", "milan"]  # one patient, two sites
    f = make_folds(df, n_folds=3, seed=0, group_by="attribution")
    assert f.groupby("attribution")["fold"].nunique().max() == 1  # each institution in one fold
    assert f.groupby("patient_id")["fold"].nunique().max() == 1
    assert f.loc[f["attribution"] == "vienna", "fold"].iloc[0] == f.loc[f["attribution"] == "milan", "fold"].iloc[0]
    assert sorted(f["fold"].unique()) == [0, 1, 2]
    # the default is unchanged: the same folds as grouping by patient alone always gave
    assert make_folds(df, 3, seed=0)["fold"].equals(make_folds(df.drop(columns="attribution"), 3, seed=0)["fold"])
    # a near-duplicate cluster kept together across patients; rows with no value stand alone
    g = fold_groups(pd.DataFrame({"patient_id": ["a", "b", None, None], "dup": ["x", "x", None, "y"]}),
                    ("patient_id", "dup"))
    assert g[0] == g[1] and len({g[1], g[2], g[3]}) == 3
    with pytest.raises(DataError, match="at least 5 groups of attribution"):
        make_folds(df, n_folds=5, group_by="attribution")  # vienna and milan joined: 4 groups
    with pytest.raises(DataError, match="no clinic column"):
        make_folds(df, n_folds=3, group_by="clinic")


# ---- reading datasets

@needs_ham
def test_load_ham10000():
    train, test = load_competition(HAM)
    assert len(train) == 10_015 and test is None
    assert train["sex"].isna().sum() == 57
    assert train["age_approx"].isna().sum() == 57
    assert train["anatom_site_general_challenge"].isna().sum() == 234
    assert set(train["sex"].dropna()) == {"male", "female"}
    assert all(os.path.isabs(f) for f in train["fname"].iloc[:10])
    assert all(os.path.isfile(f) for f in train["fname"])


def test_clean_metadata_holes_and_spelling():
    df = pd.DataFrame({"image_name": list("abcde"), "sex": [" Male ", "FEMALE", "unknown", "", None],
                       "age_approx": ["45", "n/a", "", None, 60.0],
                       "anatom_site_general_challenge": [" Torso", "HEAD/NECK ", "", None, "palms/soles"],
                       "patient_id": ["p1", " ", None, "p2", "p3"], "target": [0, 1, 0, 0, 1]})
    out = clean_metadata(df)
    assert out["sex"].tolist()[:2] == ["male", "female"] and out["sex"].iloc[2:].isna().all()
    assert out["age_approx"].iloc[0] == 45.0 and out["age_approx"].iloc[1:4].isna().all()
    # a value that cannot be an age is an error naming it, not a silent hole (it would take the missing path)
    for age in ("abc", -5, 130):
        with pytest.raises(DataError, match=f"cannot be an age in years.*{age!r}.*row 3"):
            clean_metadata(df.assign(age_approx=["45", age, "", None, 60.0]), "t.csv")
    assert clean_metadata(df.assign(sex=["M", "f", "?", "n/a", "Female"]))["sex"].tolist()[:2] == ["male", "female"]
    assert out["anatom_site_general_challenge"].tolist()[:2] == ["torso", "head/neck"]
    assert out["anatom_site_general_challenge"].iloc[2:4].isna().all()
    assert out["patient_id"].isna().tolist() == [False, True, True, False, False]
    assert "sex" in clean_metadata(df.drop(columns="sex")).columns  # absent metadata becomes missing


def _copy_layout(src, dst, train_dir, test_dir, ext=".jpg"):
    dst.mkdir()
    for csv in ("train.csv", "test.csv"):
        shutil.copy(src / csv, dst / csv)
    for split, d in (("train", train_dir), ("test", test_dir)):
        (dst / d).mkdir(parents=True, exist_ok=True)
        for f in (src / "jpeg" / split).iterdir():
            if ext == ".jpg":
                shutil.copy(f, dst / d / f.name)
            else:
                from PIL import Image
                Image.open(f).save(dst / d / (f.stem + ext))


@pytest.mark.parametrize("train_dir,test_dir,ext", [
    ("jpeg/train", "jpeg/test", ".jpg"), ("jpeg224/train", "jpeg224/test", ".jpg"), ("train", "test", ".jpeg"),
    ("images", "images", ".png"), ("512x512-dataset-melanoma", "512x512-dataset-melanoma", ".jpg"),
])
def test_layouts_are_detected(sample_dir, tmp_path, train_dir, test_dir, ext):
    _copy_layout(sample_dir, tmp_path / "d", train_dir, test_dir, ext)
    train, test = load_competition(tmp_path / "d")
    assert len(train) == 64 and len(test) == 16
    assert train["fname"].map(lambda f: f.endswith(ext) and os.path.isfile(f)).all()
    assert os.path.dirname(train["fname"].iloc[0]).endswith(train_dir.split("/")[-1])


def test_images_override(sample_dir, tmp_path):
    data = tmp_path / "csvs"
    data.mkdir()
    for csv in ("train.csv", "test.csv"):
        shutil.copy(sample_dir / csv, data / csv)
    train, test = load_competition(data, images=sample_dir / "jpeg")
    assert train["fname"].map(os.path.isfile).all() and test["fname"].map(os.path.isfile).all()


def test_missing_image_is_one_clear_error(sample_dir, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(sample_dir, d)
    gone = sorted((d / "jpeg" / "train").iterdir())[3:6]
    for f in gone:
        f.unlink()
    with pytest.raises(DataError) as e:
        load_competition(d)
    msg = str(e.value)
    assert "3 of 64 images listed in train.csv are missing" in msg
    assert all(f.stem in msg for f in gone)


def test_missing_column_is_one_clear_error(sample_dir, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(sample_dir, d)
    pd.read_csv(d / "train.csv").drop(columns="target").to_csv(d / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv lacks the column\(s\) target"):
        load_competition(d)


def test_no_train_csv(tmp_path):
    with pytest.raises(DataError, match="train.csv"):
        load_competition(tmp_path)


# ---- metadata preprocessing

def test_meta_processor_fitted_on_train_only_with_unknown_bucket():
    train = pd.DataFrame({"sex": ["male", "female", np.nan], "age_approx": [40.0, 60.0, np.nan],
                          "anatom_site_general_challenge": ["torso", "head/neck", "torso"]})
    proc = MetaProcessor.fit(train)
    assert proc.vocab["anatom_site_general_challenge"] == ["head/neck", "torso"]
    assert proc.means["age_approx"] == 50.0
    row = proc.encode_row({"sex": "male", "age_approx": np.nan, "anatom_site_general_challenge": "scalp"})
    named = dict(zip(proc.feature_names, row))
    assert named["age_approx_missing"] == 1 and named["age_approx"] == 0
    assert named["anatom_site_general_challenge=unknown"] == 1
    assert named["sex=male"] == 1 and named["sex_missing"] == 0
    assert len(row) == proc.n_features == 2 + (2 + 2) + (2 + 2)
    back = MetaProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    assert back == proc
    with pytest.raises(DataError):
        MetaProcessor.from_dict({"cat_names": ["sex"]})



def test_meta_processor_is_fastais_tabular_procs_as_json():
    """The encoding is what fastai's Categorify, FillMissing and Normalize make of the rows, fitted on training rows
    only: the same normalised values, the same `_na` flags, the same category codes; rebuilt from JSON alone."""
    import torch
    from fastai.tabular.core import Categorify, FillMissing, Normalize, TabularPandas

    rng = np.random.default_rng(3)
    n = 60
    train = pd.DataFrame({"sex": rng.choice(["male", "female", None], n),
                          "site": rng.choice(["torso", "head/neck", "palms/soles"], n),
                          "age_approx": rng.choice([30.0, 35.0, 40.0, 70.0, 85.0, np.nan], n),  # skewed: median != mean
                          "size_mm": rng.gamma(2.0, 3.0, n)})
    valid = pd.DataFrame({"sex": ["female", None, "male"], "site": ["torso", "palms/soles", "head/neck"],
                          "age_approx": [np.nan, 55.0, 20.0], "size_mm": [1.5, 4.0, 30.0]})
    cats, conts = ["sex", "site"], ["age_approx", "size_mm"]
    proc = MetaProcessor.fit(train, cat_names=cats, cont_names=conts)
    proc = MetaProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))  # what predict rebuilds

    to = TabularPandas(train, procs=[Categorify, FillMissing, Normalize], cat_names=list(cats), cont_names=list(conts),
                       reduce_memory=False)
    ref = to.new(valid)
    ref.process()
    got = proc.encode(valid)
    slots = proc.slots()
    for c in conts:
        values, flag = slots[c]
        np.testing.assert_allclose(got[:, values][:, 0], ref.items[c].to_numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[:, flag], valid[c].isna().to_numpy())  # FillMissing's age_approx_na
    for c in cats:
        values, flag = slots[c]
        codes = ref.items[c].to_numpy()  # 0 is fastai's #na#, 1.. the sorted training categories
        hot = np.concatenate([got[:, flag][:, None], got[:, values][:, :-1]], axis=1)  # missing slot first, no unknown
        np.testing.assert_array_equal(hot.argmax(1), codes)
    assert proc.fill["age_approx"] == train["age_approx"].median()  # the median, not the mean
    hole = proc.hole_value("age_approx")
    assert abs(hole) > 0.05 and got[0, slots["age_approx"][0]][0] == pytest.approx(hole)
    # metadata dropout's blank writes exactly what a real hole encodes to
    full = torch.from_numpy(proc.encode(valid.assign(age_approx=40.0, sex="male")))
    holes = torch.from_numpy(proc.encode(valid.assign(age_approx=np.nan, sex=None)))
    assert torch.allclose(proc.blank(full, ["age_approx", "sex"]), holes)
    # a column without holes in training (fastai's FillMissing would leave a new hole as NaN): still filled, flagged
    vec = proc.encode_row({"size_mm": None})
    assert np.isfinite(vec).all() and vec[slots["size_mm"][1]] == 1
    assert proc.fill["size_mm"] == pytest.approx(train["size_mm"].median())


# ---- DataLoaders

def test_batch_shapes_and_meta_untouched_by_augmentation(sample_df):
    # (metadata dropout, on by default, blanks training rows' fields on purpose: test_missing_metadata.py checks it)
    dls = melanoma_dls(sample_df, fold=0, size=48, bs=8, num_workers=0, meta_dropout=0.0)
    proc = dls.meta_proc
    train_rows = sample_df[sample_df["fold"] != 0]
    assert proc == MetaProcessor.fit(train_rows)  # fitted on the training split only
    dl = dls.train.new(shuffle=False, drop_last=False)  # augmentations stay on; row order becomes known
    img, meta, y = dl.one_batch()
    assert img.shape == (8, 3, 48, 48) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert meta.shape == (8, proc.n_features)
    expected = proc.encode(dl.dataset.items.iloc[:8])
    assert np.array_equal(meta.cpu().numpy(), expected)
    assert y.tolist() == dl.dataset.items["target"].iloc[:8].tolist()
    # the same images without batch augmentations differ: the augmentations ran and skipped meta
    plain = melanoma_dls(sample_df, fold=0, size=48, bs=8, num_workers=0, batch_tfms=[], meta_dropout=0.0)
    img0, meta0, _ = plain.train.new(shuffle=False, drop_last=False).one_batch()
    assert not torch.allclose(img0, img)
    assert torch.equal(meta0, meta)


def test_image_only_batches(sample_df):
    dls = melanoma_dls(sample_df, fold=1, size=32, bs=4, meta=False, num_workers=0)
    b = dls.one_batch()
    assert dls.n_inp == 1 and len(b) == 2 and b[0].shape == (4, 3, 32, 32)


def test_inference_dl_matches_validation_pipeline(sample_df):
    dls = melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0)
    valid = dls.valid.one_batch()
    img, meta = inference_dl(dls.valid.dataset.items, 32, dls.meta_proc, bs=8).one_batch()
    # fastai runs its affine warp as an identity on validation batches: equal up to float rounding
    assert torch.allclose(img, valid[0], atol=1e-5) and torch.equal(meta, valid[1])


def test_melanoma_dls_needs_folds(sample_dir):
    train, _ = load_competition(sample_dir)
    with pytest.raises(DataError, match="make_folds"):
        melanoma_dls(train)
