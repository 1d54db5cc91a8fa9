"""Every bad input gets one clear error (library: a MelafastError subclass; CLI: one line, exit 1), nothing written."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH
from PIL import Image
from typer.testing import CliRunner

from melafast.inference.predictor import load_predictor
from melafast.train.save import save_run
from melafast.cli import app
from melafast.data import MetaProcessor, check_images, inference_dl, load_competition, make_folds, melanoma_dls
from melafast.errors import DataError, MelafastError, RunError, WeightsError
from melafast.inference.submit import make_submission

runner = CliRunner()


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    return res.exit_code, lines, res.output


@pytest.fixture
def data(sample_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(sample_dir, d)
    return d


def _csv(d, name="train.csv"):
    return pd.read_csv(d / name, dtype={"image_name": str})


def _img(d, i=0, split="train"):
    return sorted((d / "jpeg" / split).iterdir())[i]


def no_train_csv(d): (d / "train.csv").unlink()
def missing_column(d): _csv(d).drop(columns="target").to_csv(d / "train.csv", index=False)
def empty_csv(d): (d / "train.csv").write_text("")
def header_only(d): (d / "train.csv").write_text("image_name,target\n")
def duplicate_name(d): pd.concat([_csv(d), _csv(d).head(1)]).to_csv(d / "train.csv", index=False)
def bad_target(d): _csv(d).assign(target=2).to_csv(d / "train.csv", index=False)
def missing_image(d): _img(d, 5).unlink()
def slash_name(d): _csv(d).assign(image_name=lambda x: x.image_name.where(x.index != 3, "../../etc/passwd")).to_csv(d / "train.csv", index=False)
def backslash_name(d): _csv(d).assign(image_name=lambda x: x.image_name.where(x.index != 3, "a\\b")).to_csv(d / "train.csv", index=False)
def zero_byte(d): _img(d, 2).write_bytes(b"")
def truncated(d): _img(d, 2).write_bytes(_img(d, 2).read_bytes()[: _img(d, 2).stat().st_size * 2 // 3])
def not_an_image(d): _img(d, 2).write_text("this is not a picture")


DATA_CASES = [  # (mutation, text the one error line must contain)
    (no_train_csv, "train.csv not found"),
    (missing_column, "lacks the column(s) target"),
    (empty_csv, "is empty"),
    (header_only, "has a header but no rows"),
    (duplicate_name, "twice"),
    (bad_target, "target must be 0 or 1"),
    (missing_image, "1 of 64 images listed in train.csv are missing"),
    (slash_name, "must be a plain file name"),
    (backslash_name, "must be a plain file name"),
    (zero_byte, "(empty file)"),
    (truncated, "(truncated JPEG)"),
    (not_an_image, "not a readable image"),
]
IMAGE_CASES = {zero_byte, truncated, not_an_image}


def _library_load(d):
    train, _ = load_competition(d)
    check_images(train, "error", progress=False)


@pytest.mark.parametrize("mutate,msg", DATA_CASES, ids=[m.__name__ for m, _ in DATA_CASES])
def test_bad_data_library(data, mutate, msg):
    mutate(data)
    with pytest.raises(DataError) as e:
        _library_load(data)
    assert msg in str(e.value)


@pytest.mark.parametrize("mutate,msg", DATA_CASES, ids=[m.__name__ for m, _ in DATA_CASES])
def test_bad_data_cli(data, tmp_path, mutate, msg):
    mutate(data)
    out = tmp_path / "run"
    code, err, output = cli("train", "--data", data, "--arch", TINY_ARCH, "--size", 32, "--no-pretrained",
                            "--workers", 0, "--out", out)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: melafast train: ") and msg in err[0], output
    assert "Traceback" not in output
    assert not (out / "fold0").exists()  # nothing trained, nothing half-written


@pytest.mark.parametrize("mutate", sorted(IMAGE_CASES, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_bad_images_can_be_skipped(data, mutate):
    mutate(data)
    train, _ = load_competition(data)
    good, bad = check_images(train, "skip", progress=False)
    assert len(good) == 63 and bad["image_name"].tolist() == [_img(data, 2).stem]


def test_grayscale_rgba_and_png_are_converted(data):
    first = sorted((data / "jpeg" / "train").iterdir())[:3]
    Image.open(first[0]).convert("L").save(first[0])
    Image.open(first[1]).convert("RGBA").save(first[1].with_suffix(".png"))
    first[1].unlink()
    Image.open(first[2]).convert("P").save(first[2].with_suffix(".png"))
    first[2].unlink()
    train, _ = load_competition(data)
    assert train["fname"].str.endswith(".png").sum() == 2
    good, bad = check_images(train, "error", progress=False)
    assert len(bad) == 0
    df = make_folds(good, 2)
    dls = melanoma_dls(df, fold=1, size=32, bs=8, num_workers=0)
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        assert all(img.shape[1:] == (3, 32, 32) for img, _, _ in dl)
    (grey,) = inference_dl(df[df["fname"] == str(first[0])], 32, bs=1).one_batch()
    assert grey.shape == (1, 3, 32, 32)
    assert torch.equal(grey[0, 0], grey[0, 1]) and torch.equal(grey[0, 1], grey[0, 2])  # grey stays grey


def test_unseen_and_all_missing_metadata():
    train = pd.DataFrame({"sex": [np.nan] * 4, "age_approx": [np.nan] * 4,
                          "anatom_site_general_challenge": ["torso", "torso", np.nan, "head/neck"]})
    proc = MetaProcessor.fit(train)
    assert proc.vocab["sex"] == [] and proc.means["age_approx"] == 0.0 and proc.stds["age_approx"] == 1.0
    row = dict(zip(proc.feature_names, proc.encode_row({"sex": "female", "age_approx": 70,
                                                         "anatom_site_general_challenge": "scalp"})))
    assert row["sex=unknown"] == 1 and row["anatom_site_general_challenge=unknown"] == 1
    assert np.isfinite(list(row.values())).all()


# ---- arguments

@pytest.mark.parametrize("args,msg", [
    (("--arch", "efficientnet_b33"), "did you mean efficientnet_b3"),
    (("--size", 0), "--size must be between"),
    (("--size", 100_000), "--size must be between"),
    (("--fold", 7), "--fold must be 'all' or 0..1"),
    (("--fold", "two"), "--fold must be 'all' or a fold number"),
    (("--tta", 3), "--tta must be 1, 2, 4 or 8"),
    (("--bs", 0), "--bs must be positive"),
    (("--lr", "-1"), "--lr must be positive"),
], ids=["arch", "size0", "size_huge", "fold_range", "fold_word", "tta", "bs", "lr"])
def test_bad_arguments(sample_dir, tmp_path, args, msg):
    code, err, output = cli("train", "--data", sample_dir, "--arch", TINY_ARCH, "--folds", 2, "--no-pretrained",
                            "--out", tmp_path / "run", *args)
    assert code == 1 and len(err) == 1 and msg in err[0], output
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit(sample_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    code, err, _ = cli("train", "--data", sample_dir, "--arch", TINY_ARCH, "--weights", tmp_path / "resnet18.safetensors",
                       "--size", 32, "--folds", 2, "--workers", 0, "--out", tmp_path / "run")
    assert code == 1 and len(err) == 1 and "does not fit" in err[0]
    code, err, _ = cli("train", "--data", sample_dir, "--arch", TINY_ARCH, "--weights", tmp_path / "nope.safetensors")
    assert code == 1 and "not found" in err[0]
    with pytest.raises(WeightsError):
        from melafast.model import create_backbone
        create_backbone(TINY_ARCH, weights=tmp_path / "resnet18.safetensors")


# ---- run folders

@pytest.fixture(scope="module")
def saved_model(sample_df, tmp_path_factory):
    from melafast.train.learner import melanoma_learner

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=16, num_workers=0)
    learn = melanoma_learner(dls, TINY_ARCH, pretrained=False)
    return save_run(learn, tmp_path_factory.mktemp("model") / "fold0")


def _broken_copy(saved_model, tmp_path, how):
    d = tmp_path / "run" / "fold0"
    shutil.copytree(saved_model, d)
    cfg = json.loads((d / "config.json").read_text())
    if how == "no_weights":
        (d / "model.safetensors").unlink()
    elif how == "corrupt_weights":
        (d / "model.safetensors").write_bytes(b"\x00" * 64)
    elif how == "corrupt_config":
        (d / "config.json").write_text('{"format": 1, "arch": ')
    elif how == "future_version":
        (d / "config.json").write_text(json.dumps({**cfg, "format": 99, "melafast_version": "9.0"}))
    elif how == "wrong_field":
        (d / "config.json").write_text(json.dumps({**cfg, "size": "big"}))
    elif how == "wrong_shapes":
        (d / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "meta_sizes": [64, 32]}}))
    elif how == "no_config":
        (d / "config.json").unlink()
    return d


RUN_CASES = [("no_weights", "has no model.safetensors"), ("corrupt_weights", "cannot read the weights"),
             ("corrupt_config", "not valid JSON"), ("future_version", "upgrade melafast"),
             ("wrong_field", "field 'size'"), ("wrong_shapes", "do not fit"), ("no_config", "config.json is missing")]


@pytest.mark.parametrize("how,msg", RUN_CASES, ids=[h for h, _ in RUN_CASES])
def test_broken_run_folder(saved_model, sample_dir, tmp_path, how, msg):
    d = _broken_copy(saved_model, tmp_path, how)
    if how != "no_config":
        with pytest.raises(RunError) as e:
            load_predictor(d)
        assert msg in str(e.value)
    sub = tmp_path / "submission.csv"
    code, err, output = cli("submit", "--run", d, "--data", sample_dir, "--tta", 1, "--workers", 0, "--out", sub)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), output
    assert not sub.exists()


def test_submit_needs_test_csv(saved_model, data, tmp_path):
    (data / "test.csv").unlink()
    with pytest.raises(DataError, match="no test.csv"):
        make_submission([saved_model], data=data, out=tmp_path / "s.csv", tta=1, num_workers=0, log=lambda m: None)
    assert not (tmp_path / "s.csv").exists()


def test_bad_test_image_error_or_median(saved_model, data, tmp_path):
    broken = _img(data, 0, "test")
    broken.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        make_submission([saved_model], data=data, out=tmp_path / "s.csv", tta=1, num_workers=0, log=lambda m: None)
    assert not (tmp_path / "s.csv").exists()
    code, err, output = cli("submit", "--run", saved_model, "--data", data, "--tta", 1, "--workers", 0,
                            "--out", tmp_path / "s.csv", "--on-bad-image", "skip")
    assert code == 0, output
    sub = pd.read_csv(tmp_path / "s.csv")
    assert len(sub) == 16 and "median prediction" in output
    others = sub[sub.image_name != broken.stem].target
    assert sub.loc[sub.image_name == broken.stem, "target"].item() == pytest.approx(np.median(others), abs=1e-6)


def test_no_traceback_unless_debug(tmp_path):
    code, err, output = cli("train", "--data", tmp_path / "nowhere")
    assert code == 1 and len(err) == 1 and "Traceback" not in output
    with pytest.raises(MelafastError):
        runner.invoke(app, ["--debug", "train", "--data", str(tmp_path / "nowhere")], catch_exceptions=False)


def test_image_failing_inside_a_worker_is_still_one_line(data, tmp_path, monkeypatch):
    from melafast import data as data_mod

    zero_byte(data)  # the image breaks after the up-front check (simulated by skipping that check)
    monkeypatch.setattr(data_mod, "check_images", lambda df, *a, **k: (df, df.iloc[:0]))
    code, err, output = cli("train", "--data", data, "--arch", TINY_ARCH, "--size", 32, "--bs", 16, "--epochs", 1,
                            "--freeze-epochs", 0, "--folds", 2, "--lr", "1e-2", "--no-pretrained", "--workers", 1,
                            "--out", tmp_path / "run")
    assert code == 1 and len(err) == 1, output
    assert err[0].startswith("error: melafast train: cannot read image") and _img(data, 2).name in err[0]
