"""Training switches from the winning recipes: external data, diagnosis target, melanoma upsampling."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_ARCH, copy_run
from typer.testing import CliRunner

from melafast.cli import app
from melafast.data import add_external, diagnosis_labels, melanoma_dls
from melafast.errors import MelafastError
from melafast.train.learner import melanoma_index


def _train(*args):
    res = CliRunner().invoke(app, ["train", "--arch", TINY_ARCH, "--size", 32, "--bs", 16, "--epochs", 1, "--folds", 2,
                                   "--no-pretrained", "--lr", "1e-2", "--workers", 0, "--tta", 1,
                                   *[str(a) for a in args]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_upsample_repeats_training_melanomas_only(sample_df):
    plain = melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0)
    up = melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0, upsample=3)
    n_pos = int(plain.train_ds.items["target"].sum())
    assert len(up.train_ds) == len(plain.train_ds) + 2 * n_pos
    assert up.train_ds.items["target"].sum() == 3 * n_pos
    assert up.valid_ds.items["image_name"].tolist() == plain.valid_ds.items["image_name"].tolist()
    assert up.meta_proc == plain.meta_proc  # statistics of the real rows, not of the copies


def test_external_data_trains_but_is_never_scored(sample_dir, external_dir, tmp_path):
    ext, n_ext = external_dir
    run = tmp_path / "run"
    out = _train("--data", sample_dir, "--external", ext, "--external", sample_dir, "--out", run)
    assert f"{n_ext} training rows added" in out and "0 training rows added" in out and "64 already present dropped" in out
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 64 and not oof["image_name"].str.startswith("EXT_").any()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["n_train"] == 64 and cfg["n_external"] == n_ext
    main_train = 64 - (oof["fold"] == 0).sum()
    assert f"fold 0: {main_train + n_ext} train / {(oof['fold'] == 0).sum()} valid images" in out
    # an evaluation set holding the external images is told they trained the run
    from melafast.data import load_split
    from melafast.evaluate.external import trained_on
    from melafast.runfolder import RunFolder

    seen = trained_on(RunFolder(run), load_split(ext, "train"), log=lambda m: None)
    assert len(seen) == n_ext and set(seen["reason"]) == {"the same image name as an external training image"}


def test_add_external_drops_duplicates(sample_df):
    ext = sample_df.head(5).drop(columns="fold").assign(patient_id="OTHER")
    both, n_dup = add_external(sample_df, pd.concat([ext, ext.assign(image_name=ext["image_name"] + "_x")]))
    assert n_dup == 5 and len(both) == len(sample_df) + 5 and (both["fold"] == -1).sum() == 5


def test_external_rows_of_a_main_patient_never_train_the_fold_that_validates_that_patient(sample_df):
    "Another dataset's images of a patient in the main table: in training everywhere but in that patient's fold."
    ext = sample_df.drop(columns="fold").assign(image_name=lambda d: "EXT_" + d["image_name"])
    ext.loc[ext.index[:6], "patient_id"] = "SOMEONE_ELSE"
    both, _ = add_external(sample_df, ext)
    added = both[both["fold"] == -1]
    own = sample_df.set_index("image_name")["fold"]
    shared = added["patient_id"] != "SOMEONE_ELSE"
    assert (added.loc[shared, "home_fold"].to_numpy() == own.loc[added.loc[shared, "image_name"].str[4:]].to_numpy()).all()
    assert added.loc[~shared, "home_fold"].isna().all()
    for k in (0, 1):
        trained = set(melanoma_dls(both, fold=k, size=32, bs=8, num_workers=0).train_ds.items["image_name"])
        ext_in = {n for n in added["image_name"] if n in trained}
        expected = set(added.loc[~(added["home_fold"] == k), "image_name"])
        assert ext_in == expected and not (set(sample_df.loc[sample_df["fold"] == k, "image_name"]) & trained)


def test_diagnosis_labels():
    df = pd.DataFrame({"diagnosis": ["Nevus ", "melanoma", None, "melanoma", "nevus"], "target": [0, 1, 0, 0, 1]})
    assert diagnosis_labels(df).tolist() == ["nevus", "melanoma", "unknown", "unknown", "melanoma"]


def test_diagnosis_target_scores_the_melanoma_class(make_run, sample_diagnosis, tmp_path):
    run = make_run(data=sample_diagnosis, target="diagnosis")  # shared with tests/test_surfaces.py
    fold_cfg = json.loads((run / "fold0" / "config.json").read_text())
    assert fold_cfg["vocab"] == ["melanoma", "nevus", "seborrheic keratosis"] and fold_cfg["n_out"] == 3
    assert fold_cfg["pos"] == 0
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 64 and oof["pred"].between(0, 1).all() and set(oof["target"]) == {0, 1}
    res = CliRunner().invoke(app, ["submit", "--run", str(run), "--tta", "1", "--workers", "0",
                                   "--out", str(tmp_path / "s.csv")], catch_exceptions=False)
    assert res.exit_code == 0 and len(pd.read_csv(tmp_path / "s.csv")) == 16


def test_melanoma_index():
    assert melanoma_index([0, 1]) == 1 and melanoma_index(["bcc", "melanoma", "nevus"]) == 1
    with pytest.raises(MelafastError, match="no melanoma class"):
        melanoma_index(["nevus", "bcc"])


def test_extra_meta_features_are_fitted_saved_and_recomputed(sample_dir, make_run):
    from melafast.data import add_meta_features, load_competition

    train, test = load_competition(sample_dir)
    feats = add_meta_features(train)
    per_patient = train.groupby("patient_id")["image_name"].count()
    assert (feats["n_images"] == train["patient_id"].map(per_patient)).all()
    assert np.allclose(np.expm1(feats["log_file_size"]), [__import__("os").path.getsize(f) for f in train["fname"]])
    run = make_run(extra_meta=True, fold=0)  # shared with test_missing_metadata
    proc = json.loads((run / "fold0" / "config.json").read_text())["meta_proc"]
    assert proc["cont_names"] == ["age_approx", "n_images", "log_file_size"]
    from melafast.inference.predictor import load_predictor

    pred = load_predictor(run / "fold0").predict(test, tta=1, bs=8, num_workers=0, progress=False)
    assert pred.shape == (16,) and np.isfinite(pred).all()  # the features were computed for the test table


@pytest.mark.parametrize("aug", ["light", "medium", "heavy"])
def test_augmentation_presets(sample_df, aug):
    import torch

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0, aug=aug)
    tfms = {type(u).__name__: u for u in (getattr(t, "tfm", t) for t in dls.train.after_batch.fs)}
    # fastai merges flips, rotation and zoom into one affine transform, and warps into its coordinate functions
    affine = tfms["Dihedral"]
    assert (len(affine.aff_fs), len(affine.coord_fs)) == {"light": (1, 0), "medium": (3, 0), "heavy": (3, 1)}[aug]
    assert ("RandomErasing" in tfms) == ("Hue" in tfms) == (aug == "heavy")
    img, meta, _ = dls.train.new(shuffle=False).one_batch()
    assert img.shape == (8, 3, 32, 32) and torch.isfinite(img).all()
    with pytest.raises(Exception, match="aug must be one of"):
        melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0, aug="extreme")


def test_weight_ema_is_what_validation_sees(tiny_dls):
    import torch

    from melafast.train.averaging import WeightEMA
    from melafast.train.learner import melanoma_learner

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    ema = WeightEMA(decay=0.9)
    learn.fit(2, 1e-2, cbs=ema)
    raw = {k: v.clone() for k, v in learn.model.state_dict().items()}
    averaged = ema.averaged_state()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())
    recorded_loss = learn.recorder.values[-1][1]
    learn.model.load_state_dict(averaged)
    assert learn.validate()[0] == pytest.approx(recorded_loss, rel=1e-5)  # the fit validated the average
    learn.model.load_state_dict(raw)
    assert learn.validate()[0] != pytest.approx(recorded_loss, rel=1e-5)


def test_ema_decay_zero_is_the_raw_model(tiny_dls):
    from melafast.train.averaging import WeightEMA
    from melafast.train.learner import melanoma_learner

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    ema = WeightEMA(decay=0.0)
    learn.fit(1, 1e-2, cbs=ema)
    assert all(__import__("torch").equal(v, ema.averaged_state()[k]) for k, v in learn.model.state_dict().items())


def test_train_with_ema_saves_the_average(sample_dir, tmp_path):
    run = tmp_path / "run"
    _train("--data", sample_dir, "--ema", 0.9, "--fold", 1, "--out", run)
    assert json.loads((run / "fold1" / "config.json").read_text())["ema"] == 0.9
    oof = pd.read_csv(run / "oof.csv")
    assert set(oof["fold"]) == {1} and 20 < len(oof) < 44  # fold 1 of 2, scored once each


def test_ensemble_scores_blends_honestly_and_submit_uses_it(make_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    from melafast.inference.blend import blend, crossfit_blend

    runs = [make_run(seed=1), make_run(seed=2, meta=False)]
    ens_file = tmp_path / "ensemble.json"
    res = CliRunner().invoke(app, ["ensemble", "--run", str(runs[0]), "--run", str(runs[1]), "--out", str(ens_file)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "cross-fitted over 2 folds" in res.output
    ens = json.loads(ens_file.read_text())
    a, b = (pd.read_csv(r / "oof.csv").set_index("image_name").sort_index() for r in runs)
    assert ens["candidates"]["rank"] == pytest.approx(roc_auc_score(a["target"], blend([a["pred"], b["pred"]], "rank")))
    crossfit, _ = crossfit_blend([a["pred"], b["pred"]], a["target"], a["fold"])
    assert ens["candidates"]["weighted rank"] == pytest.approx(roc_auc_score(a["target"], crossfit))
    assert ens["oof_auc"] == max(ens["candidates"].values()) and sum(ens["weights"]) == pytest.approx(1)
    assert set(ens["crossfit_weights"]) == {"0", "1"}
    sub = tmp_path / "sub.csv"
    res = CliRunner().invoke(app, ["submit", "--ensemble", str(ens_file), "--tta", "1", "--workers", "0", "--out", str(sub)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(sub)) == 16
    res = CliRunner().invoke(app, ["submit", "--tta", "1"], catch_exceptions=False)
    assert res.exit_code == 1 and "either --run DIR" in res.stderr


def _oof_runs(tmp_path, preds: dict, target, folds, selected: dict | None = None):
    "Run folders holding only an oof.csv with these predictions (and the kept epochs' ones, as --keep best writes)."
    names = [f"IMG_{i:04d}" for i in range(len(target))]
    runs = []
    for name, pred in preds.items():
        (tmp_path / name).mkdir(parents=True)
        oof = pd.DataFrame({"image_name": names, "target": target, "fold": folds, "pred": pred})
        if selected:
            oof["pred_selected"] = selected[name]
        oof.to_csv(tmp_path / name / "oof.csv", index=False)
        runs.append(str(tmp_path / name))
    return runs


def test_ensemble_of_keep_best_runs_scores_the_models_submit_uses(tmp_path):
    "With --keep best, submit loads the kept epochs' models: the ensemble weighs and scores those, said optimistic."
    from sklearn.metrics import roc_auc_score

    from melafast.inference.blend import blend, ensemble_runs

    rng = np.random.default_rng(2)
    target, folds = rng.integers(0, 2, 200), np.tile([0, 1], 100)
    last = {n: rng.normal(0, 1, 200) for n in ("a", "b")}  # the last epochs: noise
    best = {n: target + rng.normal(0, 1, 200) for n in ("a", "b")}  # the kept epochs: what submit predicts with
    logs = []
    ens = ensemble_runs(_oof_runs(tmp_path, last, target, folds, best), out=tmp_path / "e.json", log=logs.append)
    assert ens["candidates"]["mean"] == pytest.approx(roc_auc_score(target, blend([best["a"], best["b"]], "mean")))
    assert ens["oof_auc"] > 0.7 and len(ens["optimistic"]) == 2 and any("optimistic" in line for line in logs)


def test_crossfit_never_scores_a_fold_with_weights_fitted_on_its_labels():
    from melafast.inference.blend import crossfit_blend

    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 300)
    folds = np.repeat([0, 1, 2], 100)
    preds = [target + rng.normal(0, s, 300) for s in (0.8, 1.5, 3.0)]
    out, weights = crossfit_blend(preds, target, folds)
    flipped = target.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]  # other labels on fold 0 only
    out2, weights2 = crossfit_blend(preds, flipped, folds)
    assert np.array_equal(out[folds == 0], out2[folds == 0]) and weights[0] == weights2[0]
    assert weights[1] != weights2[1] or weights[2] != weights2[2]  # the other folds' weights did see fold 0


def test_ensemble_weights_only_when_the_honest_score_says_so(tmp_path):
    from melafast.inference.blend import ensemble_runs

    rng = np.random.default_rng(1)
    target = rng.integers(0, 2, 400)
    folds = np.tile([0, 1, 2, 3], 100)
    good = target + rng.normal(0, 0.7, 400)
    # a useless run: weighting it down is a real gain, and cross-fitting sees it
    ens = ensemble_runs(_oof_runs(tmp_path / "a", {"good": good, "noise": rng.normal(0, 1, 400)}, target, folds),
                        out=tmp_path / "a.json", log=lambda m: None)
    assert ens["chosen"] == "weighted rank" and ens["weights"][0] > 0.8
    assert ens["candidates"]["weighted rank"] > ens["candidates"]["rank"]
    # two runs of equal worth on 120 images: weights searched on every OOF row look better than both equal blends
    # there (and were chosen before cross-fitting), but scored on folds they never saw they lose: equal is kept
    rng = np.random.default_rng(0)
    target, folds = rng.integers(0, 2, 120), np.tile([0, 1, 2, 3], 30)
    a, b = target + rng.normal(0, 1.0, 120), target + rng.normal(0, 1.0, 120)
    ens = ensemble_runs(_oof_runs(tmp_path / "b", {"a": a, "b": b}, target, folds), out=tmp_path / "b.json",
                        log=lambda m: None)
    assert ens["weighted_in_sample_auc"] > max(ens["candidates"]["mean"], ens["candidates"]["rank"])
    assert ens["candidates"]["weighted rank"] < min(ens["weighted_in_sample_auc"], ens["oof_auc"])
    assert ens["chosen"] in ("mean", "rank") and ens["weights"] == [0.5, 0.5]


def test_blend_weights():
    from melafast.inference.blend import blend

    a, b = np.array([0.1, 0.2, 0.9]), np.array([0.9, 0.5, 0.1])
    assert np.allclose(blend([a, b], "mean", [3, 1]), 0.75 * a + 0.25 * b)
    assert np.allclose(blend([a, b], "rank", [1, 0]), [0, 0.5, 1])


def test_soft_target_loss_is_cross_entropy_on_probabilities():
    import torch

    from melafast.train.learner import SoftTargetCrossEntropy

    loss, x = SoftTargetCrossEntropy(), torch.randn(6, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(loss(x, y), torch.nn.functional.cross_entropy(x, y))
    assert torch.allclose(loss(x, torch.nn.functional.one_hot(y, 2).float()), loss(x, y))
    p = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0, 0.3])
    logq = torch.log_softmax(x, -1)
    assert torch.allclose(loss(x, torch.stack([1 - p, p], 1)), -((1 - p) * logq[:, 0] + p * logq[:, 1]).mean())


def test_add_pseudo_rows_train_only_with_soft_targets(sample_dir, sample_df):
    from melafast.data import add_pseudo, load_competition
    from melafast.errors import DataError

    _, test = load_competition(sample_dir)
    table = pd.DataFrame({"image_name": test["image_name"][:4], "soft_target": [0.05, 0.2, 0.93, 1.0]})
    both = add_pseudo(sample_df, test, table)
    added = both.iloc[len(sample_df):]
    assert len(added) == 4 and (added["fold"] == -1).all() and added["fname"].notna().all()
    assert added["soft_target"].tolist() == [0.05, 0.2, 0.93, 1.0] and added["target"].tolist() == [0, 0, 1, 1]
    real = both.iloc[: len(sample_df)]
    assert (real["soft_target"] == real["target"]).all()
    dls = melanoma_dls(both, fold=0, size=32, bs=8, num_workers=0)
    assert dls.soft and list(dls.vocab) == [0, 1]
    y = dls.train.new(shuffle=False, bs=len(dls.train_ds)).one_batch()[-1]
    assert y.shape == (len(dls.train_ds), 2) and torch_allclose(y.sum(1), 1)
    assert sorted(y[:, 1].tolist()[-4:]) == pytest.approx([0.05, 0.2, 0.93, 1.0])
    with pytest.raises(DataError, match="not in this dataset's test.csv"):
        add_pseudo(sample_df, test, pd.DataFrame({"image_name": ["NOPE"], "soft_target": [0.0]}))
    with pytest.raises(DataError, match="target='melanoma'"):
        melanoma_dls(both, fold=0, size=32, bs=8, num_workers=0, target="diagnosis")


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype).expand_as(a))


def test_pseudo_labels_then_train_on_them(sample_dir, tiny_run, tmp_path):
    first, second = copy_run(tiny_run, tmp_path / "run1"), tmp_path / "run2"
    res = CliRunner().invoke(app, ["pseudo", "--run", str(first), "--low", "0.5", "--high", "0.5", "--tta", "1",
                                   "--workers", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(first / "pseudo.csv")
    assert len(table) == 16 and (table["soft_target"] == table["pred"]).all() and (first / "pseudo.png").is_file()
    res = CliRunner().invoke(app, ["predict", "--run", str(first), "--tta", "1", "--workers", "0",
                                   "--out", str(tmp_path / "preds.csv")], catch_exceptions=False)
    preds = pd.read_csv(tmp_path / "preds.csv").set_index("image_name")["pred"]
    assert np.allclose(table.set_index("image_name")["pred"], preds.loc[table["image_name"]])
    # fold by fold: each fold model's own labels, and the teacher's folds beside them
    from melafast.data import load_competition
    from melafast.inference import load_predictor

    test = load_competition(sample_dir)[1].set_index("image_name").loc[table["image_name"]].reset_index()
    for k in (0, 1):
        own = load_predictor(first / f"fold{k}").predict(test, tta=1, num_workers=0, progress=False)
        assert np.allclose(table[f"pred_fold{k}"], own) and np.allclose(table[f"soft_target_fold{k}"], own)
    assert np.allclose(table["pred"], (table["pred_fold0"] + table["pred_fold1"]) / 2)
    teacher = pd.read_csv(first / "oof.csv")
    info = json.loads((first / "pseudo.json").read_text())
    assert info["fold_of"] == dict(zip(teacher["image_name"], teacher["fold"])) and info["seed"] == 42
    out = _train("--data", sample_dir, "--pseudo", first / "pseudo.csv", "--out", second)
    assert "16 soft-labelled test images join the training folds" in out
    assert "fold k trains only on the pseudo-labels of the teacher's fold-k model" in out
    assert json.loads((second / "config.json").read_text())["n_pseudo"] == 16
    assert "cv_note" not in json.loads((second / "results.json").read_text())
    # other folds than the teacher's: one clear error, nothing trained
    res = CliRunner().invoke(app, ["train", "--data", str(sample_dir), "--arch", TINY_ARCH, "--folds", "2", "--seed", "7",
                                   "--no-pretrained", "--pseudo", str(first / "pseudo.csv"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "folds differ" in res.stderr
    assert not (tmp_path / "x" / "fold0").exists()
    oof = pd.read_csv(second / "oof.csv")
    assert len(oof) == 64 and not oof["image_name"].isin(table["image_name"]).any()
    n_valid = (oof["fold"] == 0).sum()
    assert f"fold 0: {64 - n_valid + 16} train / {n_valid} valid images" in out
    # thresholds nothing passes: a clear error, and the histogram to choose better ones
    res = CliRunner().invoke(app, ["pseudo", "--run", str(first), "--low", "0", "--high", "1", "--tta", "1",
                                   "--workers", "0", "--out", str(tmp_path / "none.csv")])
    assert res.exit_code == 1 and "widen --low/--high" in res.stderr and not (tmp_path / "none.csv").exists()
    res = CliRunner().invoke(app, ["pseudo", "--run", str(first), "--low", "0.6", "--high", "0.4"])
    assert res.exit_code == 1 and "--low <= --high" in res.stderr


def test_swa_averages_the_last_epochs_and_recomputes_batch_norm(tiny_dls):
    import torch
    from fastai.callback.core import Callback

    from melafast.train.averaging import WeightSWA, recompute_bn
    from melafast.train.learner import melanoma_learner

    class Snapshots(Callback):
        order = 80

        def before_fit(self):
            self.states = []

        def after_epoch(self):
            self.states.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    swa, snaps = WeightSWA(2), Snapshots()
    learn.fit(3, 1e-2, cbs=[swa, snaps])
    assert swa.count == 2
    name = next(k for k, v in learn.model.state_dict().items() if k.endswith("weight") and v.ndim == 4)
    want = (snaps.states[1][name] + snaps.states[2][name]) / 2
    assert not torch.allclose(snaps.states[2][name], want)
    assert swa.apply(learn, progress=False) == 2
    assert torch.allclose(learn.model.state_dict()[name], want, atol=1e-6)
    # batch-norm statistics: the plain average of the per-batch statistics over one pass
    bn = next(m for m in learn.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().mean((0, 2, 3))))
    dl = tiny_dls.valid  # fixed order, no augmentation
    recompute_bn(learn, dl=dl, progress=False)
    hook.remove()
    assert len(seen) == len(dl) and torch.allclose(bn.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_train_with_swa_keeps_and_scores_the_average(sample_dir, tmp_path):
    run = tmp_path / "run"
    out = _train("--data", sample_dir, "--epochs", 2, "--swa", 2, "--fold", 0, "--out", run)
    assert json.loads((run / "fold0" / "config.json").read_text())["kept_epoch"] == "swa"
    metrics, oof = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "oof.csv")
    assert metrics["phase"].tolist() == ["frozen", "unfrozen", "unfrozen", "swa"]
    from sklearn.metrics import roc_auc_score

    # the saved model is the one scored in the swa row (the OOF predictions use TTA x1 here, like that row)
    assert metrics["melanoma_auc"].iloc[-1] == pytest.approx(roc_auc_score(oof["target"], oof["pred"]), abs=1e-9)
    assert "swa" in out


@pytest.mark.parametrize("args, msg", [(("--swa", 2, "--ema", 0.9), "choose one"),
                                       (("--swa", 3), "averages more epochs"),
                                       (("--pseudo", "x.csv", "--target", "diagnosis"), "--target melanoma only")])
def test_averaging_and_pseudo_option_errors(sample_dir, args, msg):
    res = CliRunner().invoke(app, ["train", "--data", str(sample_dir), "--epochs", "2", *[str(a) for a in args]])
    assert res.exit_code == 1 and msg in res.stderr, res.output


def test_each_fold_trains_on_its_own_teachers_pseudo_labels(sample_dir, sample_df, tmp_path):
    from melafast.data import add_pseudo, load_competition, pseudo_for_fold
    from melafast.config import TrainConfig
    from melafast.train.table import build_table

    _, test = load_competition(sample_dir)
    table = pd.DataFrame({"image_name": test["image_name"][:3], "soft_target": [0.05, np.nan, 0.95],
                          "soft_target_fold0": [0.02, 0.97, np.nan], "soft_target_fold1": [0.08, np.nan, 0.93]})
    both = add_pseudo(sample_df, test, table)
    f0, f1 = pseudo_for_fold(both, 0), pseudo_for_fold(both, 1)
    pseudo0, pseudo1 = f0[f0["fold"] == -1], f1[f1["fold"] == -1]
    assert pseudo0["soft_target"].tolist() == [0.02, 0.97] and pseudo0["target"].tolist() == [0, 1]
    assert pseudo1["soft_target"].tolist() == [0.08, 0.93] and len(f0) == len(sample_df) + 2
    assert not any(c.startswith("soft_target_fold") for c in f0.columns)
    assert (f0.iloc[: len(sample_df)]["soft_target"] == sample_df["target"]).all()  # labelled rows keep their label
    # a table from before per-fold labels still trains, but the CV is then said to be optimistic
    table[["image_name", "soft_target"]].fillna(0.5).to_csv(tmp_path / "old.csv", index=False)
    logs = []
    built = build_table(TrainConfig(data=str(sample_dir), folds=2, pseudo=str(tmp_path / "old.csv"), workers=0), logs.append)
    assert not built.pseudo_per_fold and built.n_pseudo == 3 and any("the CV is optimistic" in line for line in logs)


def test_read_pseudo_checks_the_file(tmp_path):
    from melafast.data import read_pseudo
    from melafast.errors import DataError

    f = tmp_path / "p.csv"
    with pytest.raises(DataError, match="does not exist"):
        read_pseudo(f)
    f.write_text("image_name,soft_target\nA,0.2\nB,1.3\n")
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        read_pseudo(f)
    f.write_text("image_name,soft_target\nA,0.2\nA,0.3\n")
    with pytest.raises(DataError, match="twice"):
        read_pseudo(f)
    f.write_text("image_name,pred\nA,0.2\n")
    with pytest.raises(DataError, match="soft_target"):
        read_pseudo(f)
    f.write_text("image_name,pred,soft_target\nA,0.93,0.93\nB,0.01,0\n")
    assert read_pseudo(f)["soft_target"].tolist() == [0.93, 0.0]


def test_shades_of_gray_makes_the_illuminant_grey():
    "Shades of Gray (p = 6): a colour cast is removed; a grey-lit image is left as it is; numbers as the formula says."
    import torch

    from melafast.model import shades_of_gray

    g = torch.Generator().manual_seed(0)
    scene = torch.rand(2, 1, 24, 24, generator=g).expand(2, 3, 24, 24) * 0.7  # grey surfaces under white light
    scene = scene * (0.9 + 0.2 * torch.rand(2, 3, 24, 24, generator=g))  # some colour in the surfaces
    cast = torch.tensor([1.0, 0.8, 0.55]).view(1, 3, 1, 1)
    out = shades_of_gray(scene * cast, 6)
    light = out.pow(6).mean(dim=(2, 3)).pow(1 / 6)
    assert (light.max(dim=1).values / light.min(dim=1).values).max() < 1.01  # the channels' p-means now agree
    before = (scene * cast).pow(6).mean(dim=(2, 3)).pow(1 / 6)
    assert (before.max(dim=1).values / before.min(dim=1).values).min() > 1.5  # and did not before
    # the formula, written out with numpy for one image
    x = (scene * cast)[0].permute(1, 2, 0).numpy().astype(np.float64)
    e = np.power(np.mean(np.power(x, 6), axis=(0, 1)), 1 / 6)
    e = e / np.sqrt(np.sum(e ** 2))
    want = np.clip(x / (e * np.sqrt(3)), 0, 1)
    assert np.abs(out[0].permute(1, 2, 0).numpy() - want).max() < 1e-5
    grey = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(shades_of_gray(grey, 6), grey, atol=1e-5)  # white light: unchanged


def test_a_run_with_colour_constancy_and_folds_by_a_column(constancy_run, sample_dir, tmp_path):
    "The settings reach the saved models and the folds; the models apply constancy (taking it away moves the scores)."
    from conftest import run_output

    from melafast.inference import load_predictor

    cfg = json.loads((constancy_run / "config.json").read_text())["settings"]
    assert cfg["color_constancy"] == 6 and cfg["group_by"] == "sex"
    oof = pd.read_csv(constancy_run / "oof.csv").merge(pd.read_csv(sample_dir / "train.csv")[["image_name", "sex"]])
    assert oof.dropna(subset=["sex"]).groupby("sex")["fold"].nunique().max() == 1  # each value in one fold
    assert "folds grouped by sex (2 values, each patient kept whole)" in run_output(constancy_run)
    images = sample_dir / "jpeg" / "test"
    with_cc = load_predictor(constancy_run).predict(images, num_workers=0, progress=False)
    plain = copy_run(constancy_run, tmp_path / "plain")
    for f in plain.glob("fold*/config.json"):
        spec = json.loads(f.read_text())
        assert spec["model"].pop("color_constancy") == 6
        f.write_text(json.dumps(spec))
    without = load_predictor(plain).predict(images, num_workers=0, progress=False)
    # (a one-epoch run scores near 0.49 everywhere: a move far above float noise, 1e-7, is the constancy's)
    assert np.abs(np.asarray(with_cc) - np.asarray(without)).max() > 2e-5


def test_negatives_drawn_afresh_each_epoch(sample_df, tmp_path):
    "--neg-per-pos K: every melanoma and K times as many others per epoch, a new seeded draw each time."
    from melafast.config import TrainConfig
    from melafast.data.blocks import NegativeDraw
    from melafast.train.fold import fold_learner

    positive = np.r_[np.ones(10, bool), np.zeros(90, bool)]
    a, b = NegativeDraw(positive, 3, seed=7), NegativeDraw(positive, 3, seed=7)
    first, second = a(), a()
    assert len(first) == len(second) == a.n == 40
    assert set(range(10)) <= set(first) and set(range(10)) <= set(second)  # every positive, every epoch
    assert set(first) - set(range(10)) != set(second) - set(range(10))  # the negatives drawn afresh
    assert b() == first and b() == second  # seeded: the same run draws the same epochs
    assert NegativeDraw(positive, 20).n == 100  # fewer negatives than asked: all of them
    with pytest.raises(MelafastError, match="none"):
        NegativeDraw(np.zeros(5, bool), 1)
    # in a fold's DataLoaders: the training epoch reads positives and their draw; validation reads every row
    dls = melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0, neg_per_pos=1, seed=3)
    plain = melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0)
    n_pos = int(plain.train_ds.items["target"].sum())
    labels = np.concatenate([y.cpu().numpy() for *_, y in dls.train])
    assert dls.train.n == 2 * n_pos and len(labels) == 4 * (2 * n_pos // 4) and len(dls.valid_ds) == len(plain.valid_ds)
    assert abs(labels.sum() - n_pos) <= 4  # half the epoch is melanomas (the last partial batch dropped)
    # from the training settings
    cfg = TrainConfig(arch=TINY_ARCH, size=32, bs=4, folds=2, pretrained=False, workers=0, neg_per_pos=2)
    learn = fold_learner(sample_df, 0, cfg, tmp_path)
    assert learn.dls.train.n == n_pos + min(2 * n_pos, len(plain.train_ds) - n_pos)
