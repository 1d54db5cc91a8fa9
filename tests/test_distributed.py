"""Data-parallel training: two CPU processes (gloo) launched by torchrun train one fold of the sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH
from sklearn.metrics import roc_auc_score


@pytest.fixture(scope="module")
def odd_sample(tmp_path_factory):
    from melafast.data import make_sample

    # 61 images: the validation fold is odd-sized, so the 2 processes get padded shares that must be undone
    return make_sample(tmp_path_factory.mktemp("ddp") / "data", n_train=61, n_test=8, seed=3, px=64)


@pytest.fixture(scope="module")
def ddp_run(odd_sample, tmp_path_factory):
    "One fold of the sample trained by two CPU processes (gloo), and what they printed."
    run = tmp_path_factory.mktemp("ddp_run") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "melafast",
           "train", "--data", str(odd_sample), "--arch", TINY_ARCH, "--size", "32", "--bs", "8", "--epochs", "1",
           "--folds", "2", "--fold", "0", "--lr", "1e-2", "--no-pretrained", "--workers", "0", "--tta", "1",
           "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run.parent / "stdout.txt").write_text(res.stdout)
    return run


def test_two_processes_train_one_fold(ddp_run, odd_sample):
    run = ddp_run
    assert (run.parent / "stdout.txt").read_text().count("Cross-validated melanoma AUC") == 1  # only rank 0 reports
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "fold0", "metrics.csv", "oof.csv",
                                                     "results.json", "roc.png"]
    oof = pd.read_csv(run / "oof.csv")
    from melafast.config import TrainConfig
    from melafast.train.table import build_table

    # the training table's folds (patients and near-duplicate images grouped; --seed's default)
    folds = build_table(TrainConfig(data=str(odd_sample), folds=2, workers=0), log=lambda m: None).df
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


def test_saved_fold_model_reproduces_its_out_of_fold_predictions(ddp_run, odd_sample):
    "What was validated is what is shipped: the fold model rank 0 saved, reloaded, predicts its oof.csv rows again."
    from melafast.data import load_competition
    from melafast.inference import load_predictor

    oof = pd.read_csv(ddp_run / "oof.csv")
    train = load_competition(odd_sample)[0].set_index("image_name").loc[oof["image_name"]].reset_index()
    predictor = load_predictor(ddp_run / "fold0")
    pred = predictor.predict(train, num_workers=0, progress=False)
    assert np.allclose(pred, oof["pred"], atol=1e-5)
    with pytest.warns(UserWarning, match="31 of 31 images have no metadata"):
        blank = predictor.predict(train.assign(sex=np.nan, age_approx=np.nan, anatom_site_general_challenge=np.nan),
                                  num_workers=0, progress=False)
    assert np.allclose(blank, oof["pred_no_meta"], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Synchronised batch norm keeps the network (checked on the CPU: the conversion and eval mode need no GPU)


@pytest.fixture
def meta_model():
    from melafast.model import MelanomaModel

    torch.manual_seed(0)
    model = MelanomaModel(TINY_ARCH, n_meta=6, pretrained=False)
    with torch.no_grad():  # batch-norm statistics of a trained model, not the identity of a new one
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_sync_batchnorm_keeps_timm_activations_where_torch_drops_them(meta_model):
    import copy

    from timm.layers import BatchNormAct2d

    from melafast.train.distributed import sync_batchnorm

    x, meta = torch.rand(3, 3, 64, 64), torch.randn(3, 6)
    with torch.no_grad():
        ref = torch.softmax(meta_model(x, meta), -1)
        fused = sum(isinstance(m, BatchNormAct2d) for m in meta_model.modules())
        assert fused > 10  # batch norms with their activation fused in: what torch's conversion breaks
        # the trap this guards against: torch's conversion (fastai's sync_bn=True) changes the network
        torch_converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(meta_model)).eval()
        assert (torch.softmax(torch_converted(x, meta), -1) - ref).abs().max() > 1e-3
        ours = sync_batchnorm(copy.deepcopy(meta_model)).eval()
        assert not any(isinstance(m, BatchNormAct2d) and not isinstance(m, torch.nn.SyncBatchNorm)
                       for m in ours.modules())  # every batch norm is synchronised now
        assert torch.equal(torch.softmax(ours(x, meta), -1), ref)


def test_sync_batchnorm_weights_load_into_the_model_load_predictor_builds(meta_model, tiny_dls, tmp_path):
    "The converted network's weights, saved as training saves them, rebuild the same network for prediction."
    from melafast.train.save import save_model
    from melafast.train.distributed import sync_batchnorm
    from melafast.inference import load_predictor
    from melafast.train.learner import melanoma_learner

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    learn.model = sync_batchnorm(learn.model)
    with torch.no_grad():
        for m in learn.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
    save_model(learn, tmp_path / "fold0", extra=dict(fold=0, tta=1))
    rebuilt = load_predictor(tmp_path / "fold0").model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in rebuilt.modules())
    img, meta, _ = tiny_dls.valid.one_batch()
    learn.model.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(img, meta), learn.model(img, meta), atol=1e-6)


def test_frozen_epochs_hold_the_statistics_of_synchronised_batch_norm(tiny_dls):
    "fastai's BnFreeze knows only nn.BatchNorm1d/2d/3d: under data-parallel training it froze nothing."
    from fastai.callback.training import BnFreeze

    from melafast.train.distributed import sync_batchnorm
    from melafast.train.learner import FrozenBN, melanoma_learner

    def buffers(model):
        return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}

    for frozen_bn, moved in ((FrozenBN, False), (BnFreeze, True)):
        learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False, frozen_bn=False, cbs=[frozen_bn()])
        learn.model = sync_batchnorm(learn.model)  # what to_distributed does on GPUs
        learn.freeze()
        before = buffers(learn.model)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
        after = buffers(learn.model)
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed is moved, frozen_bn.__name__
