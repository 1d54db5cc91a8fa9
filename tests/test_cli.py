import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import HAM, LITE0, TINY_ARCH, needs_ham, needs_lite0, run_output
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from melafast.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_every_error_line_names_its_command():
    "The error line names the command from its function's name: it must be the name the command is registered under."
    from typer.main import get_command

    from melafast.cli.app import command_name

    commands = get_command(app).commands
    assert len(commands) >= 15
    assert {command_name(cmd.callback): name for name, cmd in commands.items()} == {n: n for n in commands}


def test_help_imports_no_torch():
    code = "import sys, melafast.cli; print('torch' in sys.modules, 'fastai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    res = subprocess.run([sys.executable, "-m", "melafast", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("train", "lr-find", "predict", "submit", "prepare", "download", "sample"):
        assert cmd in res.stdout


def _train_args(data, out, *extra):
    return ["train", "--data", data, "--arch", TINY_ARCH, "--size", 32, "--bs", 16, "--epochs", 1, "--folds", 2,
            "--no-pretrained", "--lr", "1e-2", "--workers", 0, "--tta", 2, "--out", out, *extra]


@pytest.fixture(scope="module")
def trained_run(make_run):
    "The session's tiny run with TTA x2 (shared with test_reliability), and what `melafast train` printed."
    out = make_run(tta=2)
    return out, run_output(out)


def test_train_writes_a_complete_run_folder(trained_run, sample_dir):
    out, output = trained_run
    assert "Cross-validated melanoma AUC" in output and "OOF" in output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["arch"] == TINY_ARCH and cfg["settings"]["size"] == 32
    assert cfg["data"] == str(sample_dir.resolve()) and "torch" in cfg["versions"]
    for k in (0, 1):
        fold_cfg = json.loads((out / f"fold{k}" / "config.json").read_text())
        assert fold_cfg["fold"] == k and fold_cfg["arch"] == TINY_ARCH
        assert (out / f"fold{k}" / "model.safetensors").stat().st_size > 10_000
    train = pd.read_csv(sample_dir / "train.csv")
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["image_name", "target", "fold", "pred", "pred_no_meta"]
    assert sorted(oof["image_name"]) == sorted(train["image_name"]) and len(oof) == len(train)
    assert oof["pred"].between(0, 1).all() and oof["pred_no_meta"].between(0, 1).all()
    merged = oof.merge(train, on="image_name", suffixes=("", "_csv"))
    assert (merged["target"] == merged["target_csv"]).all()
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["fold", "epoch", "phase", "train_loss", "valid_loss", "melanoma_auc", "seconds"]
    assert len(metrics) == 2 * 2 and metrics["phase"].tolist() == ["frozen", "unfrozen"] * 2
    results = json.loads((out / "results.json").read_text())
    assert results["oof_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["pred"]))
    assert results["oof_auc_no_meta"] == pytest.approx(roc_auc_score(oof["target"], oof["pred_no_meta"]))
    assert "AUC, no metadata" in output  # the CV table's column for images that come without metadata
    from melafast.metrics import pauc, sens_at_spec

    assert results["oof_pauc"] == pytest.approx(pauc(oof["target"], oof["pred"])) and results["pauc_min_tpr"] == 0.8
    assert results["fold_paucs"]["0"] == pytest.approx(pauc(*oof.query("fold == 0")[["target", "pred"]].T.values))
    assert results["oof_sens_at_spec90"] == pytest.approx(sens_at_spec(oof["target"], oof["pred"], 0.9))
    oof_line = next(line.split() for line in output.splitlines() if line.strip().startswith("OOF "))
    assert oof_line[3:5] == [f"{results['oof_auc']:.4f}", f"{results['oof_pauc']:.4f}"]  # AUC, then pAUC
    for png in ("curves.png", "roc.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 300


def test_submit_matches_the_template(trained_run, sample_dir, tmp_path):
    out, _ = trained_run
    sub_path = tmp_path / "submission.csv"
    res = invoke("submit", "--run", out, "--tta", 2, "--out", sub_path, "--workers", 0)
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(sub_path)
    template = pd.read_csv(sample_dir / "sample_submission.csv")
    assert list(sub.columns) == ["image_name", "target"]
    assert sub["image_name"].tolist() == template["image_name"].tolist()
    assert sub["target"].between(0, 1).all() and sub["target"].nunique() > 1
    rank = tmp_path / "rank.csv"
    res = invoke("submit", "--run", out, "--run", out / "fold0", "--blend", "rank", "--tta", 1, "--out", rank, "--workers", 0)
    assert res.exit_code == 0, res.output
    assert pd.read_csv(rank)["image_name"].tolist() == template["image_name"].tolist()


def test_predict_train_split(trained_run, sample_dir, tmp_path):
    out, _ = trained_run
    res = invoke("predict", "--run", out, "--split", "train", "--tta", 1, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns) == ["image_name", "pred", "run", "pred_min", "pred_max", "target"] and len(preds) == 64


def test_upload_without_credentials_keeps_the_file(trained_run, tmp_path, monkeypatch):
    out, _ = trained_run
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    sub = tmp_path / "submission.csv"
    res = invoke("submit", "--run", out, "--tta", 1, "--out", sub, "--workers", 0, "--upload")
    assert res.exit_code != 0
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: melafast submit: upload failed") and str(sub) in err[0]
    assert len(pd.read_csv(sub)) == 16


def test_lr_find_command(sample_dir, tmp_path):
    png = tmp_path / "lr.png"
    res = invoke("lr-find", "--data", sample_dir, "--arch", TINY_ARCH, "--size", 32, "--bs", 16, "--folds", 2,
                 "--no-pretrained", "--workers", 0, "--out", png)
    assert res.exit_code == 0, res.output
    assert "valley" in res.output and png.stat().st_size > 1000
    valley = float(res.output.split("valley")[1].split()[0])
    assert 1e-7 < valley < 10


def test_bad_arguments_give_one_line(sample_dir, tmp_path):
    for args, msg in [(("--tta", 3), "--tta must be 1, 2, 4 or 8"), (("--fold", 5), "--fold must be 'all' or 0..1"),
                      (("--lr", "fast"), "--lr must be a number or 'auto'")]:
        res = invoke(*_train_args(sample_dir, tmp_path / "r"), *args)
        assert res.exit_code == 1 and res.stderr.strip().startswith("error: melafast train: ") and msg in res.stderr


def test_prepare_resizes_once(sample_dir, tmp_path):
    out = tmp_path / "p32"
    res = invoke("prepare", "--src", sample_dir, "--out", out, "--size", 32, "--workers", 2)
    assert res.exit_code == 0, res.output
    src = sorted(p.stem for p in (sample_dir / "jpeg" / "train").iterdir())
    assert sorted(p.stem for p in (out / "train").iterdir()) == src
    with Image.open(next((out / "test").iterdir())) as im:
        assert im.size == (32, 32)
    assert (out / "sample_submission.csv").is_file()
    res = invoke("prepare", "--src", sample_dir, "--out", out, "--size", 32, "--workers", 1)
    assert "0 images resized" in res.output and "80 already done" in res.output


def test_resize_keeps_aspect(tmp_path):
    from melafast.data.prepare import resize_image

    Image.new("RGB", (300, 200), "red").save(tmp_path / "a.jpg")
    assert resize_image(str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), 100)
    with Image.open(tmp_path / "b.jpg") as im:
        assert im.size == (150, 100)
    assert not resize_image(str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), 100)


def test_sample_command(tmp_path):
    res = invoke("sample", "--out", tmp_path / "s", "--n-train", 20, "--n-test", 5)
    assert res.exit_code == 0 and "SYNTHETIC" in res.output
    assert len(pd.read_csv(tmp_path / "s" / "train.csv")) == 20
    assert "SYNTHETIC" in (tmp_path / "s" / "README.txt").read_text()


def _ham_kaggle_layout(dest, n_train=240, n_test=60, seed=0):
    "A Kaggle-layout dataset from real HAM10000 images, lesions kept whole within train or test."
    df = pd.read_csv(HAM / "train.csv")
    rng = np.random.default_rng(seed)
    lesions = df.groupby("patient_id")["target"].max()
    mel = rng.permutation(lesions[lesions == 1].index)
    other = rng.permutation(lesions[lesions == 0].index)
    picked = df[df["patient_id"].isin(np.concatenate([mel[:80], other[:220]]))]
    picked = picked.drop_duplicates("patient_id").sample(frac=1, random_state=seed)  # one image per lesion
    train, test = picked.iloc[:n_train], picked.iloc[n_train:n_train + n_test]
    for split, part in (("train", train), ("test", test)):
        (dest / "jpeg" / split).mkdir(parents=True)
        for name in part["image_name"]:
            shutil.copy(HAM / "images" / f"{name}.jpg", dest / "jpeg" / split / f"{name}.jpg")
    train.to_csv(dest / "train.csv", index=False)
    test.drop(columns=["target", "diagnosis", "benign_malignant"]).to_csv(dest / "test.csv", index=False)
    pd.DataFrame({"image_name": test["image_name"], "target": 0}).to_csv(dest / "sample_submission.csv", index=False)
    return train, test


@needs_ham
@needs_lite0
def test_real_images_with_local_weights(tmp_path):
    data = tmp_path / "ham"
    train, test = _ham_kaggle_layout(data)
    run = tmp_path / "run"
    res = invoke("train", "--data", data, "--arch", "tf_efficientnet_lite0", "--weights", LITE0, "--size", 64,
                 "--bs", 32, "--epochs", 1, "--folds", 2, "--lr", "2e-3", "--tta", 2, "--workers", 2, "--out", run)
    assert res.exit_code == 0, res.output
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == len(train) and oof["target"].sum() == train["target"].sum()
    res = invoke("submit", "--run", run, "--tta", 2, "--out", tmp_path / "sub.csv", "--workers", 2)
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["image_name"].tolist() == test["image_name"].tolist()
    assert sub["target"].between(0, 1).all() and sub["target"].notna().all()


def test_train_one_fold_with_lr_auto(make_run, sample_dir):
    out = make_run(lr="auto", fold=1, tta=2)
    assert (out / "fold1" / "lr_find.png").stat().st_size > 1000 and not (out / "fold0").exists()
    assert not list((out / "fold1").glob("*.pth"))  # lr_find's temporary checkpoint is cleaned up
    lr = json.loads((out / "fold1" / "config.json").read_text())["lr"]
    assert 1e-7 < lr < 10
    oof = pd.read_csv(out / "oof.csv")
    from melafast.config import TrainConfig
    from melafast.train.table import build_table

    # the training table's folds (patients and near-duplicates grouped; the CLI's --seed default)
    folds = build_table(TrainConfig(data=str(sample_dir), folds=2, workers=0), log=lambda m: None).df
    assert set(oof["fold"]) == {1}
    assert sorted(oof["image_name"]) == sorted(folds.loc[folds["fold"] == 1, "image_name"])
