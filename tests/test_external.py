"""`melafast evaluate`: a run scored on labelled images from elsewhere, its figures checked against an independent
computation (sklearn, predict's own output, the operating point's rule applied by hand)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import HAM, invoke, needs_ham
from sklearn.metrics import roc_auc_score


N_EXT = 40  # labelled images of other patients


def _external(sample_dir, dest, clash: int = 3):
    """A labelled set of other synthetic patients (names EXT_*; none a look-alike of a training image to the
    perceptual hash), plus `clash` rows that copy images the run trained on under their training names, and, with
    `clash`, one training image resized to 80% under a new name and patient (EXT_COPY): evaluate leaves all those out."""
    from conftest import without_lookalikes
    from PIL import Image

    from melafast.data import make_sample

    src = make_sample(dest.parent / "ext-src", n_train=N_EXT + 20, n_test=1, seed=5, px=64)
    (dest / "jpeg" / "train").mkdir(parents=True)
    table = pd.read_csv(src / "train.csv")
    for name in table["image_name"]:
        shutil.copy(src / "jpeg" / "train" / f"{name}.jpg", dest / "jpeg" / "train" / f"EXT_{name}.jpg")
    table["image_name"] = "EXT_" + table["image_name"]
    table["patient_id"] = "EXT_" + table["patient_id"]
    table = without_lookalikes(table, dest / "jpeg" / "train", sample_dir).head(N_EXT)
    assert len(table) == N_EXT
    table["attribution"] = np.where(np.arange(len(table)) % 2, "clinic A", "clinic B")
    trained = pd.read_csv(sample_dir / "train.csv").head(clash)
    for name in trained["image_name"]:
        shutil.copy(sample_dir / "jpeg" / "train" / f"{name}.jpg", dest / "jpeg" / "train")
    parts = [table, trained.assign(attribution="clinic A")]
    if clash:
        src_row = pd.read_csv(sample_dir / "train.csv").iloc[[10]]
        im = Image.open(sample_dir / "jpeg" / "train" / f"{src_row['image_name'].iloc[0]}.jpg")
        im.resize((int(im.width * 0.8), int(im.height * 0.8))).save(dest / "jpeg" / "train" / "EXT_COPY.jpg", quality=85)
        parts.append(src_row.assign(image_name="EXT_COPY", patient_id="EXT_P_COPY", attribution="clinic B"))
    pd.concat(parts).to_csv(dest / "train.csv", index=False)
    return dest


def test_evaluate_checked_against_an_independent_computation(tiny_run, sample_dir, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ext = _external(sample_dir, tmp_path / "ext")
    assert invoke("operating-point", "--run", run, "--goal", "sens90", "--bootstrap", 20).exit_code == 0
    res = invoke("evaluate", "--run", run, "--data", ext, "--bootstrap", 50, "--errors", 2, "--workers", 0)
    assert res.exit_code == 0, res.output
    assert f"warning: 4 of {N_EXT + 4} images were in the run's training data" in res.output
    out = run / "evaluations" / "ext"
    result = json.loads((out / "evaluation.json").read_text())
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == N_EXT and scores["image_name"].str.startswith("EXT_").all()  # the 4 trained on: left out
    reasons = {r["image_name"]: r["reason"] for r in result["left_out"]}
    assert sorted(v for k, v in reasons.items() if k != "EXT_COPY") == ["the same image name as a training image"] * 3
    assert reasons["EXT_COPY"].startswith("a near-duplicate of training image SYNTH_000010")  # found by its pixels
    table = pd.read_csv(ext / "train.csv")
    # predict's answer, with the metadata and with none
    table = table[table["image_name"].isin(scores["image_name"])]
    images = tmp_path / "imgs"
    images.mkdir()
    for name in table["image_name"]:
        shutil.copy(ext / "jpeg" / "train" / f"{name}.jpg", images)
    table.drop(columns=["target"]).to_csv(tmp_path / "meta.csv", index=False)
    for meta, column in ((["--meta", tmp_path / "meta.csv"], "pred"), ([], "pred_no_meta")):
        assert invoke("predict", "--run", run, "--images", images, *meta, "--workers", 0, "--out",
                      tmp_path / "p.csv").exit_code == 0
        want = pd.read_csv(tmp_path / "p.csv").set_index("image_name")["pred"]
        assert np.abs(scores.set_index("image_name")[column] - want.loc[scores["image_name"]].to_numpy()).max() < 1e-6
    # the figures, from sklearn and by hand
    auc = roc_auc_score(scores["target"], scores["pred"])
    assert result["external"]["headline"]["auc"]["value"] == pytest.approx(auc, abs=1e-12)
    assert result["no_meta"]["headline"]["auc"]["value"] == pytest.approx(roc_auc_score(scores["target"],
                                                                                         scores["pred_no_meta"]))
    oof = pd.read_csv(run / "oof.csv")
    own = roc_auc_score(oof["target"], oof["pred"])
    assert result["oof"]["headline"]["auc"]["value"] == pytest.approx(own)
    assert result["gap"]["auc"] == pytest.approx(own - auc)
    lo, hi = result["external"]["headline"]["auc"]["lo"], result["external"]["headline"]["auc"]["hi"]
    assert lo <= auc <= hi and hi - lo > 0.01
    point = json.loads((run / "threshold.json").read_text())
    models = scores[[c for c in scores.columns if c.startswith("pred_model")]].to_numpy()
    assert models.shape[1] == 2 and np.allclose(models.mean(axis=1), scores["pred"])
    decision = (models >= point["threshold"]).sum(axis=1) * 2 >= models.shape[1]  # the vote: at least half
    mel = scores["target"].to_numpy() == 1
    here = result["operating_point"]["here"]
    assert here["sensitivity"]["value"] == pytest.approx(decision[mel].mean())
    assert here["specificity"]["value"] == pytest.approx(1 - decision[~mel].mean())
    assert result["operating_point"]["called_melanoma"] == int(decision.sum())
    # subgroups over the institution column, found by itself
    inst = [g for g in result["subgroups"] if g["variable"] == "institution"]
    assert {g["group"] for g in inst} == {"clinic A", "clinic B"} and sum(g["images"] for g in inst) == N_EXT
    page = (out / "evaluation.html").read_text()
    assert f"{auc:.4f}" in page and f"{own:.4f}" in page and "Worst errors" in page
    # the card lists it
    assert invoke("card", "--run", run, "--bootstrap", 20).exit_code == 0
    card = (run / "MODEL_CARD.md").read_text()
    assert f"- ext ({ext}; {N_EXT} images" in card and f"ROC AUC {auc:.4f}" in card


def test_evaluate_refuses_what_it_cannot_evaluate(tiny_run, sample_dir, tmp_path):
    ext = _external(sample_dir, tmp_path / "ext", clash=0)
    table = pd.read_csv(ext / "train.csv")
    for mutate, msg in ((lambda t: t.drop(columns="target"), "has no labels"),
                        (lambda t: t.assign(target=0), f"holds 0 melanomas in {N_EXT} images")):
        mutate(table).to_csv(ext / "train.csv", index=False)
        res = invoke("evaluate", "--run", tiny_run, "--data", ext, "--out", tmp_path / "o")
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and msg in res.stderr, res.output
        assert res.stderr.startswith("error: melafast evaluate: ")
    res = invoke("evaluate", "--run", tiny_run)
    assert res.exit_code == 1 and "--data FOLDER" in res.stderr
    table.to_csv(ext / "train.csv", index=False)
    res = invoke("evaluate", "--run", tiny_run, "--data", ext, "--group-by", "clinic", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "--group-by clinic" in res.stderr


@needs_ham
def test_evaluate_on_ham10000_images_the_run_never_saw(ham_evaluation):
    "Real images from the Queensland practice, with their institution and label source as subgroups."
    out, table = ham_evaluation
    result = json.loads((out / "evaluation.json").read_text())
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == len(table) and result["external"]["melanomas"] == int(table["target"].sum())
    assert result["external"]["headline"]["auc"]["value"] == pytest.approx(roc_auc_score(scores["target"],
                                                                                         scores["pred"]))
    variables = {g["variable"] for g in result["subgroups"]}
    assert {"sex", "age", "site", "dx_type"} <= variables  # --group-by dx_type (one institution: no such rows)
    assert "institution" not in variables
    assert HAM.name in result["source"] or "ham" in result["source"]


def test_an_evaluation_in_words_says_when_the_metadata_costs_auc(tiny_run, tmp_path):
    "The card and the report name each evaluation; where the metadata path is measurably worse, they say what to do."
    from melafast.evaluate.external import evaluation_in_words

    e = dict(name="clinic B", source="/data/b", external=dict(images=500, melanomas=60,
                                                              headline=dict(auc=dict(value=0.65, lo=0.6, hi=0.7))),
             gap=dict(auc=0.2), no_meta=dict(headline=dict(auc=dict(value=0.69, lo=0.64, hi=0.74))),
             metadata_effect=[dict(key="auc", diff=-0.04, lo=-0.07, hi=-0.01)])
    text = evaluation_in_words(e)
    assert "ROC AUC 0.6500 (0.6000 to 0.7000)" in text and "minus this +0.2000" in text
    assert "The metadata costs AUC there (-0.0400, -0.0700 to -0.0100)" in text
    e["metadata_effect"][0]["hi"] = 0.01  # the interval reaches 0: nothing measured, nothing said
    assert "costs" not in evaluation_in_words(e)
    # the report says where the run was evaluated, or that it never was
    run = shutil.copytree(tiny_run, tmp_path / "run")
    args = ["--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance", "--no-audit"]
    assert invoke("report", "--run", run, *args).exit_code == 0
    assert "Every figure on this page comes from the clinic the run trained on" in (run / "report.html").read_text()
    (run / "evaluations" / "b").mkdir(parents=True)
    (run / "evaluations" / "b" / "evaluation.json").write_text(json.dumps(e))
    assert invoke("report", "--run", run, *args).exit_code == 0
    assert "Evaluated elsewhere (`melafast evaluate`): clinic B (/data/b; 500 images" in (run / "report.html").read_text()
