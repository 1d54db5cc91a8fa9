"""melafast report: every section present and self-contained; statistics checked against independent computations."""

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from melafast.cli import app
from melafast.metrics import age_band, bootstrap_auc, calibration, operating_points, subgroup_aucs, weighted_auc
from melafast.evaluate.report import SECTIONS


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run(tiny_run, tmp_path):
    "A copy of the session's tiny run (2 folds, TTA x1) that this test may write into."
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


class _Page(HTMLParser):
    "Sections, images and every URL-bearing attribute of an HTML page."

    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.urls, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "data", "srcset", "action") and v]


def test_report_has_every_section_self_contained(run, tmp_path):
    res = invoke("report", "--run", run, "--workers", 0, "--bootstrap", 200)
    assert res.exit_code == 0, res.output
    page = _Page()
    page.feed((run / "report.html").read_text())
    assert page.sections == list(SECTIONS)
    # ROC/PR, calibration, subgroups, two error grids, the audit's two, importance, curves: the ROC once
    assert len(page.imgs) == 9
    for src in page.imgs:  # every image embedded, and each a real PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(u.startswith(("data:", "#")) for u in page.urls)  # nothing to fetch from anywhere
    assert not {"script", "link", "iframe"} & set(page.tags)
    figures = sorted(p.name for p in (run / "report_figures").iterdir())
    assert figures == ["audit.csv", "audit.png", "audit_artefacts.png", "calibration.png", "false_alarms.png",
                       "metadata_importance.png", "missed_melanomas.png", "roc_pr.png", "subgroups.png"]
    html = (run / "report.html").read_text()
    assert f"<h1>melafast report: {run.name}</h1>" in html  # the folder's name, not the machine's path to it
    oof = pd.read_csv(run / "oof.csv")
    assert f"Out-of-fold ROC AUC {roc_auc_score(oof['target'], oof['pred']):.4f}" in html
    # the ISIC 2024 metric beside it, checked against sklearn's McClish pAUC of the swapped classes, unscaled
    scaled = roc_auc_score(1 - oof["target"], -oof["pred"], max_fpr=0.2)
    assert f"<td>partial AUC above 80% sensitivity</td>\n      <td>{0.02 + 0.36 * (scaled - 0.5):.4f}</td>" in html
    # the second CV figure: every patient field blanked, and whether the run was trained for that path
    assert f"score AUC {roc_auc_score(oof['target'], oof['pred_no_meta']):.4f}" in html
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["image_head"] and "image-only head, trained on every training image" in html
    assert f"metadata dropout ({settings['meta_dropout']}) trains the joint head" in html
    assert "The maps were computed in fp32 on cpu" in html  # the precision the Grad-CAM pass used, said
    # the CAM layer and its grid named; the map is of the plain view while the score is the TTA mean
    assert re.search(r"taken at backbone layer [\w.]+ \(stride \d+: a \d+ x \d+ grid at 32 px\)", html)
    assert "explain the plain view" in html and "By diagnosis: melanoma " in html
    # operating points: cross-fitted with intervals, the in-sample figure only as optimistic; nothing saved unasked
    assert "cross-fitted" in html and "in-sample sensitivity (optimistic)" in html
    assert not (run / "threshold.json").exists()
    assert "Each artefact drawn synthetically onto every one of the 64 out-of-fold images" in html


def test_galleries_show_one_image_per_lesion_and_keep_carcinomas_apart_from_benign_lesions():
    from melafast.evaluate.gallery import galleries

    df = pd.DataFrame(dict(
        image_name=[f"I{i}" for i in range(9)],
        lesion_id=["L1", "L1", "L2", "L3", "L4", "L4", "L5", None, None],
        diagnosis=["melanoma", "melanoma", "melanoma", "nevus", "Basal cell carcinoma", "basal cell carcinoma",
                   "benign keratosis", "nevus", "nevus"],
        target=[1, 1, 1, 0, 0, 0, 0, 0, 0],
        pred=[0.10, 0.05, 0.30, 0.90, 0.95, 0.97, 0.80, 0.85, 0.70]))
    got = galleries(df, n=8)
    assert list(got) == ["missed_melanomas", "false_alarms", "other_malignant"]
    assert got["missed_melanomas"][1]["image_name"].tolist() == ["I1", "I2"]  # L1 once, by its lowest score
    assert got["other_malignant"][1]["image_name"].tolist() == ["I5"]  # the carcinoma is no false alarm
    benign = got["false_alarms"][1]
    assert benign["image_name"].tolist() == ["I3", "I7", "I8", "I6"]  # nevi first (the worst is one), then keratosis
    assert set(benign["diagnosis"]) == {"nevus", "benign keratosis"}  # rows without a lesion id stand alone
    assert len(galleries(df, n=1)["false_alarms"][1]) == 1


def test_report_errors_are_one_line(run, sample_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "oof.csv").unlink()
    res = invoke("report", "--run", broken)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "has no oof.csv" in res.stderr
    other = tmp_path / "other"  # a data folder that is not the run's: other images
    from melafast.data import make_sample

    make_sample(other, n_train=20, n_test=2, seed=9, px=32)
    names = pd.read_csv(other / "train.csv")
    names["image_name"] = "OTHER_" + names["image_name"]
    for f in (other / "jpeg" / "train").iterdir():
        f.rename(f.with_name("OTHER_" + f.name))
    names.to_csv(other / "train.csv", index=False)
    res = invoke("report", "--run", run, "--data", other)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "does not hold the images" in res.stderr
    res = invoke("report", "--run", tmp_path / "nowhere")
    assert res.exit_code == 1 and "config.json" in res.stderr


# --------------------------------------------------------------------------------------------------
# The statistics, against independent computations


def _toy(n, seed=0):
    rng = np.random.default_rng(seed)
    target = (rng.random(n) < 0.2).astype(int)
    return target, np.round(rng.random(n) * 0.6 + 0.4 * target * rng.random(n), 3)


def test_images_without_a_patient_are_each_their_own_patient_in_the_bootstrap():
    target, pred = _toy(400)
    none = np.full(400, np.nan, dtype=object)
    assert bootstrap_auc(target, pred, groups=none, n_boot=200) == bootstrap_auc(target, pred, n_boot=200)
    half = np.where(np.arange(400) < 200, np.arange(400) // 4, None).astype(object)  # 50 patients, 200 unknown
    ci = bootstrap_auc(target, pred, groups=half, n_boot=200)
    lumped = bootstrap_auc(target, pred, groups=np.where(np.arange(400) < 200, np.arange(400) // 4, -1), n_boot=200)
    assert ci["hi"] - ci["lo"] < lumped["hi"] - lumped["lo"]  # 200 images drawn as one "patient" widen the interval


def test_weighted_auc_is_the_auc_of_the_resample():
    target, pred = _toy(500)
    rows = np.random.default_rng(1).integers(0, 500, 500)
    assert weighted_auc(target, pred, np.bincount(rows, minlength=500)) == pytest.approx(
        roc_auc_score(target[rows], pred[rows]))


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_rows():
    small, large = _toy(300), _toy(3000)
    ci_small, ci_large = bootstrap_auc(*small, n_boot=300), bootstrap_auc(*large, n_boot=300)
    for ci, (t, p) in ((ci_small, small), (ci_large, large)):
        assert ci["lo"] <= ci["auc"] <= ci["hi"] and ci["auc"] == pytest.approx(roc_auc_score(t, p))
    assert ci_large["hi"] - ci_large["lo"] < 0.6 * (ci_small["hi"] - ci_small["lo"])
    # resampling whole patients: ten copies of each image are one patient, not ten independent rows
    t, p = small
    rows = bootstrap_auc(np.repeat(t, 10), np.repeat(p, 10), n_boot=300)
    patients = bootstrap_auc(np.repeat(t, 10), np.repeat(p, 10), groups=np.repeat(np.arange(300), 10), n_boot=300)
    assert patients["hi"] - patients["lo"] > 2 * (rows["hi"] - rows["lo"])


def test_operating_points_match_a_direct_threshold_count():
    target, pred = _toy(2000, seed=3)
    points = operating_points(target, pred)
    for p in points.itertuples():
        called = pred >= p.threshold
        sens = (called & (target == 1)).sum() / (target == 1).sum()
        spec = (~called & (target == 0)).sum() / (target == 0).sum()
        assert p.sensitivity == pytest.approx(sens) and p.specificity == pytest.approx(spec)
        assert p.tp + p.fn == target.sum() and p.tn + p.fp == (target == 0).sum()
        goal = float(p.goal.split(">= ")[1].rstrip("%")) / 100
        if p.goal.startswith("specificity"):
            assert spec >= goal
            # no other cut with at least that specificity finds more melanomas
            assert all((pred >= t)[target == 1].mean() <= sens + 1e-12 for t in np.unique(pred)
                       if (pred < t)[target == 0].mean() >= goal)
        else:
            assert sens >= goal


def test_calibration_by_hand():
    target, pred = _toy(1000, seed=4)
    cal = calibration(target, pred, bins=10)
    assert cal["bins"]["images"].sum() == 1000
    gaps = [abs(pred[m].mean() - target[m].mean()) * m.sum()
            for m in (np.minimum((pred * 10).astype(int), 9) == b for b in range(10)) if m.any()]
    assert cal["ece"] == pytest.approx(sum(gaps) / 1000) and cal["brier"] == pytest.approx(np.mean((pred - target) ** 2))


def test_subgroup_counts_add_up_and_small_groups_get_no_auc():
    target, pred = _toy(600, seed=5)
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"target": target, "pred": pred, "patient_id": rng.integers(0, 200, 600).astype(str),
                       "sex": rng.choice(["male", "female", None], 600, p=[0.49, 0.49, 0.02]),
                       "age_approx": rng.choice([20.0, 35.0, 50.0, 65.0, 80.0, np.nan], 600)})
    table = subgroup_aucs(df, {"sex": df["sex"], "age": age_band(df["age_approx"])}, n_boot=100)
    for name, part in table.groupby("variable"):
        assert part["images"].sum() == 600 and part["melanomas"].sum() == target.sum()
    assert table[table["variable"] == "age"]["group"].tolist() == ["under 30", "30-44", "45-59", "60-74", "75+",
                                                                   "unknown"]
    small = table["melanomas"] < 5
    assert table.loc[small, "auc"].isna().all() and table.loc[small, "note"].str.contains("too few").all()
    male = df["sex"] == "male"
    row = table[(table["variable"] == "sex") & (table["group"] == "male")].iloc[0]
    assert row["auc"] == pytest.approx(roc_auc_score(target[male], pred[male])) and row["lo"] <= row["auc"] <= row["hi"]


# --------------------------------------------------------------------------------------------------
# Grad-CAM, metadata importance, fastai's interpretation


def test_cam_maps_have_the_image_size_and_differ_across_images(run, sample_dir):
    from melafast.inference.predictor import load_predictor
    from melafast.data import inference_dl, load_competition
    from melafast.evaluate.explain import grad_cam

    p = load_predictor(run / "fold0")
    train, _ = load_competition(sample_dir)
    img, meta = next(iter(inference_dl(train.head(6), 32, p.meta_proc, bs=6, num_workers=0)))
    maps = grad_cam(p.model, img.as_subclass(torch.Tensor), meta, p.config["pos"])
    assert maps.shape == (6, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() == 1 for m in maps if m.any())  # each scaled to its own peak
    flat = maps.reshape(6, -1)
    assert len({tuple(np.round(m, 4)) for m in flat}) == 6  # six images, six different maps


def test_cam_layer_has_enough_cells_for_the_input_size():
    from melafast.evaluate.explain import describe_cam_layer
    from melafast.model import MelanomaModel

    model = MelanomaModel("mobilenetv3_small_050", pretrained=False, n_meta=0)
    assert "(stride 16: a 24 x 24 grid at 384 px)" in describe_cam_layer(model, 384)  # not the last stage's 12 x 12
    assert "(stride 16: a 14 x 14 grid at 224 px)" in describe_cam_layer(model, 224)
    assert "(stride 32: a 16 x 16 grid at 512 px)" in describe_cam_layer(model, 512)


def test_a_cam_gallery_shares_one_colour_scale_with_a_colour_bar(run, tmp_path, monkeypatch):
    from melafast.evaluate import gallery, plots
    from melafast.evaluate.runview import fold_models, oof_with_metadata, read_run
    from melafast.runfolder import RunFolder

    folder = RunFolder(run)
    config, oof = read_run(folder)
    df, _ = oof_with_metadata(folder, config, oof, None, None)
    calls, real = [], plots.plot_cam_grid
    monkeypatch.setattr(plots, "plot_cam_grid", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    html = gallery.error_section(fold_models(folder), df, tmp_path, 4, 16, 0, "cpu")
    assert calls and "one colour scale" in html and "What it cannot" in html
    for (imgs, maps, *_), kw in calls:
        peaks = [float(m.max()) for m in maps]
        assert kw["vmax"] == pytest.approx(max(peaks)) and kw["scale"]
        assert min(peaks) < max(peaks)  # not each stretched to its own peak: a faint map stays faint


def test_metadata_importance_blanks_fields_as_a_missing_field_is_scored(run, sample_dir):
    from melafast.inference.predictor import load_predictor
    from melafast.data import load_competition
    from melafast.evaluate.explain import metadata_importance

    oof = pd.read_csv(run / "oof.csv")  # trained with --tta 1: the plain view
    train, _ = load_competition(sample_dir)
    df = oof.merge(train.drop(columns="target"), on="image_name")
    models = {k: load_predictor(run / f"fold{k}") for k in (0, 1)}
    table = metadata_importance(models, df, num_workers=0, progress=False).set_index("field")
    assert table.loc["all fields given", "auc"] == pytest.approx(roc_auc_score(df["target"], df["pred"]), abs=1e-4)
    assert set(table.index) == {"all fields given", "sex", "anatom_site_general_challenge", "age_approx",
                                "every field blanked"}
    assert (table["drop"] == table.loc["all fields given", "auc"] - table["auc"]).all()
    # every field blanked is the path of a patient without metadata: the run's own no-metadata OOF figure
    assert table.loc["every field blanked", "auc"] == pytest.approx(roc_auc_score(df["target"], df["pred_no_meta"]),
                                                                    abs=1e-4)
    # blanking is the missing-field path, not a shuffle: the same call gives the same table
    again = metadata_importance(models, df, num_workers=0, progress=False).set_index("field")
    assert np.allclose(again["auc"], table["auc"])


def test_fastai_top_losses_work_on_image_and_metadata_batches(tiny_dls):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastai.interpret import ClassificationInterpretation

    from melafast.train.learner import melanoma_learner

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    learn.fit(1, 1e-2)
    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == len(tiny_dls.valid_ds)
    losses, _ = interp.top_losses(4)
    interp.plot_top_losses(4)
    titles = [ax.get_title() for ax in plt.gcf().axes if ax.get_title()]
    assert len(titles) == 4 and [float(t.split(" / ")[2]) for t in titles] == pytest.approx(losses.tolist(), abs=0.006)
    plt.close("all")
