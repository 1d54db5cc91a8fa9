"""Validation you can trust: the CV scores no choice made on its own rows, frozen means frozen, models learn."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH, run_output
from fastai.callback.core import Callback
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from melafast.cli import app
from melafast.train.learner import melanoma_learner
from melafast.config import TrainConfig
from melafast.train.run import train_run


def silent(msg):
    pass


def _cfg(sample_dir, out, **kw):
    return TrainConfig(**{**dict(data=str(sample_dir), arch=TINY_ARCH, size=32, bs=16, epochs=3, lr=1e-2, folds=2,
                                 pretrained=False, tta=1, workers=0, out=str(out)), **kw})


@pytest.fixture(scope="module")
def best_run(make_run):
    "The session's tiny run with 3 epochs, keeping each fold's best epoch; and what `melafast train` printed."
    from melafast.train.run import RunResult

    path = make_run(keep="best", epochs=3)
    res = json.loads((path / "results.json").read_text())
    result = RunResult(path, {int(k): v for k, v in res["fold_aucs"].items()}, res["oof_auc"], res["keep"],
                       res.get("oof_auc_selected"))
    return result, run_output(path)


def test_keep_best_reports_the_honest_and_the_selected_cv(best_run):
    result, output = best_run
    run = result.path
    metrics, oof = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "oof.csv")
    results = json.loads((run / "results.json").read_text())
    assert results["keep"] == "best" and "optimistic" in results["epoch_rule"] and "optimistic" in output
    assert list(oof.columns) == ["image_name", "target", "fold", "pred", "pred_selected", "pred_no_meta"]
    for k, rows in oof.groupby("fold"):
        epochs = metrics[metrics["fold"] == k]
        assert len(epochs) == 4  # 1 frozen + 3
        # with TTA x1 the OOF predictions are the epoch metric's own predictions: `pred` is the last epoch's model,
        # `pred_selected` the best epoch's, and the kept (saved) model is the best epoch's
        assert roc_auc_score(rows["target"], rows["pred"]) == pytest.approx(epochs["melanoma_auc"].iloc[-1], abs=1e-6)
        assert roc_auc_score(rows["target"], rows["pred_selected"]) == pytest.approx(epochs["melanoma_auc"].max(), abs=1e-6)
        kept = json.loads((run / f"fold{k}" / "config.json").read_text())["kept_epoch"]
        assert kept == epochs.loc[epochs["melanoma_auc"].idxmax(), "epoch"]
    assert results["oof_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["pred"])) == result.oof_auc
    assert results["oof_auc_selected"] == pytest.approx(roc_auc_score(oof["target"], oof["pred_selected"]))
    assert result.oof_auc_selected == results["oof_auc_selected"]
    # selection on the scored rows can only flatter each fold
    for k, auc in results["fold_aucs_selected"].items():
        assert auc >= results["fold_aucs"][k] - 1e-9


def test_keep_best_saves_the_selected_model(best_run, sample_dir):
    from melafast.inference.predictor import load_predictor
    from melafast.data import load_competition

    run = best_run[0].path
    oof = pd.read_csv(run / "oof.csv").set_index("image_name")
    train, _ = load_competition(sample_dir)
    rows = train[train["image_name"].isin(oof.index[oof["fold"] == 0])]
    pred = load_predictor(run / "fold0").predict(rows, tta=1, num_workers=0)
    assert np.allclose(pred, oof.loc[rows["image_name"], "pred_selected"], atol=1e-5)


def test_keep_best_records_the_saved_models_figures_with_and_without_metadata(best_run, sample_dir):
    """`pred_no_meta`, `oof_auc_no_meta`, each fold's recorded AUCs and what predict says describe the saved (kept)
    model, not the last epoch's: its predictions with every field blanked are the image head's at the kept epoch,
    chosen by the joint head's validation AUC (`melanoma_auc`)."""
    from melafast.data import load_competition
    from melafast.inference import load_predictor, predict_many

    run = best_run[0].path
    oof, metrics = pd.read_csv(run / "oof.csv").set_index("image_name"), pd.read_csv(run / "metrics.csv")
    results = json.loads((run / "results.json").read_text())
    train, _ = load_competition(sample_dir)
    predictor = load_predictor(run)
    moved = 0
    for model in predictor.predictors:
        k = model.spec.fold
        rows = train[train["image_name"].isin(oof.index[oof["fold"] == k])]
        (plain,), (blank,) = predict_many([model], rows, tta=1, num_workers=0, progress=False, blank=True)
        want = oof.loc[rows["image_name"]]
        assert np.allclose(plain, want["pred_selected"], atol=1e-5) and np.allclose(blank, want["pred_no_meta"], atol=1e-5)
        assert model.spec.valid_auc == pytest.approx(roc_auc_score(want["target"], want["pred_selected"]))
        assert model.spec.valid_auc_no_meta == pytest.approx(roc_auc_score(want["target"], want["pred_no_meta"]))
        epochs = metrics[metrics["fold"] == k]
        assert model.spec.kept_epoch == epochs.loc[epochs["melanoma_auc"].idxmax(), "epoch"]  # the joint head's AUC
        moved += model.spec.kept_epoch != epochs["epoch"].iloc[-1]
    assert moved, "no fold kept an epoch before the last: this run cannot tell the kept model from the last one"
    assert results["oof_auc_no_meta"] == pytest.approx(roc_auc_score(oof["target"], oof["pred_no_meta"]))
    assert "kept by the joint head's validation AUC" in results["no_meta_note"]
    assert predictor.figures["auc"] == results["oof_auc_selected"] and "optimistic" in predictor.figures["scope"]


def test_keep_last_is_the_default_and_keeps_the_last_epoch(sample_dir, tmp_path):
    logs = []
    result = train_run(_cfg(sample_dir, tmp_path / "run", epochs=2, fold=1), log=logs.append)
    metrics, oof = pd.read_csv(result.path / "metrics.csv"), pd.read_csv(result.path / "oof.csv")
    assert "pred_selected" not in oof.columns and result.oof_auc_selected is None and result.keep == "last"
    results = json.loads((result.path / "results.json").read_text())
    assert results["keep"] == "last" and "oof_auc_selected" not in results and "honest" in results["epoch_rule"]
    assert json.loads((result.path / "fold1" / "config.json").read_text())["kept_epoch"] == 2
    assert result.oof_auc == pytest.approx(metrics["melanoma_auc"].iloc[-1], abs=1e-6)
    assert any("each fold keeps the model after the last epoch" in m for m in logs)


def test_keep_and_swa_and_lr_find_on_are_checked(sample_dir):
    for args, msg in [(("--keep", "best", "--swa", "1"), "--keep best does not apply"),
                      (("--keep", "first"), "--keep"), (("--lr-find-on", "head"), "--lr-find-on")]:
        res = CliRunner().invoke(app, ["train", "--data", str(sample_dir), *args])
        assert res.exit_code != 0 and msg in res.output + (res.stderr or ""), res.output


# --------------------------------------------------------------------------------------------------
# Frozen means frozen


def _bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_frozen_epochs_leave_batch_norm_statistics_alone(tiny_dls, frozen_bn):
    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False, frozen_bn=frozen_bn)
    learn.freeze()
    before = _bn_buffers(learn.model.backbone)
    mlp_before = _bn_buffers(learn.model.meta_mlp)
    learn.fit(1, 1e-2)
    moved = [k for k, v in _bn_buffers(learn.model.backbone).items() if not torch.equal(v, before[k])]
    if frozen_bn:
        assert moved == []  # running means and variances untouched (and no batch counted)
    else:  # fastai's default: the statistics keep adapting while the weights are frozen
        assert len(moved) > len(before) // 2
    # the metadata MLP trains in both cases: its batch norm keeps learning its statistics
    assert any(not torch.equal(v, mlp_before[k]) for k, v in _bn_buffers(learn.model.meta_mlp).items())
    learn.unfreeze()  # once unfrozen, the backbone's statistics follow the data again
    before = _bn_buffers(learn.model.backbone)
    learn.fit(1, 1e-3)
    assert sum(not torch.equal(v, before[k]) for k, v in _bn_buffers(learn.model.backbone).items()) > len(before) // 2


def test_train_saves_the_batch_norm_choice(sample_dir, tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", str(sample_dir), "--arch", TINY_ARCH, "--size", "32", "--bs", "16",
                                   "--epochs", "1", "--folds", "2", "--fold", "0", "--no-pretrained", "--lr", "1e-2",
                                   "--workers", "0", "--tta", "1", "--adapt-bn", "--out", str(tmp_path / "run")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["frozen_bn"] is False


# --------------------------------------------------------------------------------------------------
# Which model lr_find runs on


class _FrozenDuringFit(Callback):
    def before_fit(self):
        self.frozen = self.opt.frozen_idx > 0


@pytest.mark.parametrize("on, frozen", [("frozen", True), ("unfrozen", False)])
def test_lr_find_runs_on_the_model_asked_for(tiny_dls, tmp_path, on, frozen):
    from melafast.train.fold import find_lr

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False, path=tmp_path, model_dir=".")
    spy = _FrozenDuringFit()
    learn.add_cb(spy)
    lr = find_lr(learn, tmp_path / "lr.png", on)
    assert spy.frozen is frozen and 1e-7 < lr < 10 and (tmp_path / "lr.png").stat().st_size > 1000


def test_lr_find_sees_the_rows_train_would_use(sample_dir, external_dir, tmp_path, monkeypatch):
    "`melafast lr-find` (which data-parallel runs rely on) builds its table as `train` does: extras and external rows."
    from melafast.train import run as run_module

    ext, n_ext = external_dir
    seen = {}

    def spy(learn, on, funcs):
        seen["dls"] = learn.dls
        learn.freeze()
        return type("Sugg", (), {"_asdict": lambda self: {"valley": 1e-3}})()

    monkeypatch.setattr(run_module, "phase_lr_find", spy)
    cfg = TrainConfig(data=str(sample_dir), arch=TINY_ARCH, size=32, bs=16, folds=2, fold=0, pretrained=False,
                      workers=0, extra_meta=True, external=[str(ext)])
    run_module.lr_find_run(cfg, out=tmp_path / "lr.png", log=silent)
    dls = seen["dls"]
    assert dls.meta_proc.cont_names == ["age_approx", "n_images", "log_file_size"]
    names = dls.train_ds.items["image_name"]
    assert names.str.startswith("EXT_").sum() == n_ext and len(dls.valid_ds) + len(names) == 64 + n_ext


# --------------------------------------------------------------------------------------------------
# A model that learns nothing fails CI


def test_the_main_job_learns_the_sample(main_job):
    """README command 1 with its default seed: the honest OOF AUC must stay well above chance (0.5).

    Its label depends on the drawn lesion and the metadata; a pipeline that breaks images, metadata, labels or
    training scores about 0.5 here.
    """
    results = json.loads((main_job[0] / "results.json").read_text())
    assert results["keep"] == "last"
    assert results["oof_auc"] >= LEARNING_FLOOR, results
    assert min(results["fold_aucs"].values()) >= 0.65, results


LEARNING_FLOOR = 0.75  # the main job measured 0.8 or more on every seed tried (README, Results)
