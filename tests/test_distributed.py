"""Data-parallel training: two CPU processes (gloo) launched by torchrun train one fold of the sample."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import TINY_ARCH
from sklearn.metrics import roc_auc_score


@pytest.fixture(scope="module")
def odd_sample(tmp_path_factory):
    from melafast.data import make_sample

    # 61 images: the validation fold is odd-sized, so the 2 processes get padded shares that must be undone
    return make_sample(tmp_path_factory.mktemp("ddp") / "data", n_train=61, n_test=8, seed=3, px=64)


def test_two_processes_train_one_fold(odd_sample, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "melafast",
           "train", "--data", str(odd_sample), "--arch", TINY_ARCH, "--size", "32", "--bs", "8", "--epochs", "1",
           "--folds", "2", "--fold", "0", "--lr", "1e-2", "--no-pretrained", "--workers", "0", "--tta", "1",
           "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("Cross-validated melanoma AUC") == 1  # only rank 0 reports
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "fold0", "metrics.csv", "oof.csv",
                                                     "results.json", "roc.png"]
    oof = pd.read_csv(run / "oof.csv")
    from melafast.data import load_competition, make_folds

    folds = make_folds(load_competition(odd_sample)[0], n_folds=2, seed=42)
    valid = folds[folds["fold"] == 0]
    assert len(valid) % 2 == 1 and sorted(oof["image_name"]) == sorted(valid["image_name"])  # each image once
    auc = json.loads((run / "results.json").read_text())["fold_aucs"]["0"]
    assert 0 <= auc <= 1 and auc == pytest.approx(roc_auc_score(oof["target"], oof["pred"]))
    # the epoch metric was computed over the whole validation set, gathered from both processes:
    # at the kept (last) epoch it equals the AUC of the kept model's plain predictions on every validation image
    metrics = pd.read_csv(run / "metrics.csv")
    kept = json.loads((run / "fold0" / "config.json").read_text())["kept_epoch"]
    assert kept == metrics["epoch"].max()
    assert metrics.loc[metrics["epoch"] == kept, "melanoma_auc"].item() == pytest.approx(auc, abs=1e-6)
