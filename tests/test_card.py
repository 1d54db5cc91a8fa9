"""`melafast card`: a Hugging Face model card whose every figure is checked against the run folder."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from melafast.cli import app
from melafast.metrics import bootstrap_auc, bootstrap_pauc, calibration, sens_at_spec, spec_at_sens, top_n_sensitivity


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(text: str) -> list:
    "The rows of the Markdown table in `text` as lists of cells."
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_every_figure_of_the_card_comes_from_the_run(tiny_run, sample_dir, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert invoke("report", "--run", run, "--workers", 0, "--bootstrap", 100, "--errors", 0, "--no-importance",
                  "--operating-point", "sens90", "--prevalence", 0.02).exit_code == 0
    res = invoke("card", "--run", run, "--bootstrap", 300)
    assert res.exit_code == 0, res.output
    card = (run / "MODEL_CARD.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(head)  # the Hugging Face header parses, with the run's figures
    assert meta["library_name"] == "melafast" and "melanoma" in meta["tags"]
    oof = pd.read_csv(run / "oof.csv")
    train = pd.read_csv(sample_dir / "train.csv")
    patients = oof["image_name"].map(train.set_index("image_name")["patient_id"])
    ci = bootstrap_auc(oof["target"], oof["pred"], patients, n_boot=300)
    pci = bootstrap_pauc(oof["target"], oof["pred"], patients, n_boot=300)
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"roc_auc": round(ci["auc"], 4), "pauc": round(pci["pauc"], 4),
                       "sens_at_spec90": round(sens_at_spec(oof["target"], oof["pred"]), 4),
                       "spec_at_sens90": round(spec_at_sens(oof["target"], oof["pred"]), 4),
                       "top15_sens": round(top_n_sensitivity(oof["target"], oof["pred"], patients), 4)}

    config = json.loads((run / "config.json").read_text())
    model = _section(body, "Model")
    assert f"timm `{config['settings']['arch']}`" in model and "2 fold model(s)" in model
    assert f"{config['settings']['size']} px" in model and f"seed {config['settings']['seed']}" in model
    assert f"torch {config['versions']['torch']}" in model
    from melafast.evaluate.card import _command

    assert _command("/usr/x/bin/melafast train --data d --out r") == "`melafast train --data d --out r`"
    assert "from Python" in model  # (this run was trained in-process, from the tests)

    data = _section(body, "Training data")
    assert f"{config['n_train']} training images, {config['n_melanoma']} melanomas" in data
    assert f"{patients.nunique()} patients" in data
    groups = _rows(data)
    sex = train.set_index("image_name").loc[oof["image_name"], "sex"].fillna("unknown").value_counts()
    for row in groups:
        if row[0] == "sex":
            assert int(row[2]) == sex.get(row[1], 0)
    assert sum(int(r[2]) for r in groups if r[0] == "site") == len(oof)  # every image in one site group
    assert "Under-represented" in data

    ev = _section(body, "Evaluation (out-of-fold, patient-grouped cross-validation)")
    assert f"ROC AUC **{ci['auc']:.4f}** (95% interval {ci['lo']:.4f} to {ci['hi']:.4f};" in ev
    assert "(intervals from 300 bootstrap resamples of whole patients)" in ev
    assert f"**{pci['pauc']:.4f}** (95% interval {pci['lo']:.4f} to {pci['hi']:.4f};" in ev
    cal = calibration(oof["target"], oof["pred"])
    assert f"calibration error {cal['ece']:.4f}, Brier score {cal['brier']:.4f}" in ev
    results = json.loads((run / "results.json").read_text())
    assert f"ROC AUC {results['oof_auc_no_meta']:.4f}" in ev
    assert [[float(c) for c in r[3:5]] for r in _rows(ev)] == [
        [round(results["fold_aucs"][k], 4), round(results["fold_paucs"][k], 4)] for k in ("0", "1")]

    point = json.loads((run / "threshold.json").read_text())
    op = _section(body, "Operating point")
    assert f"threshold {point['threshold']:.4f}" in op and point["rule"] in op
    table = _rows(op)
    assert [float(c) for c in table[0][2:]] == [round(point["crossfit"]["sensitivity"][k], 3) for k in ("value", "lo", "hi")]
    assert table[-1][:2] == ["NPV", "2.0%"]
    assert float(table[-1][2]) == round(point["crossfit"]["predictive"][1]["NPV"]["value"], 3)

    audit = pd.read_csv(run / "report_figures" / "audit.csv")  # the report ran the audit: its table is the card's
    rows = _rows(_section(body, "Shortcut audit"))
    assert [r[0] for r in rows] == audit["artefact"].tolist()
    assert [float(r[1]) for r in rows] == pytest.approx(audit["benign change"].round(3).tolist(), abs=1e-9)
    assert [r[-1] for r in rows] == [str(f) for f in audit["flagged"]]
    numbers = re.findall(r"\d+\.\d+", body)
    assert len(numbers) > 60  # the card is made of figures, each checked above by section


def test_card_without_operating_point_audit_or_data(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for extra in ("threshold.json", "audit.csv", "report_figures/audit.csv"):
        (run / extra).unlink(missing_ok=True)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    res = invoke("card", "--run", run, "--bootstrap", 50, "--out", tmp_path / "card.md")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "card.md").read_text()
    assert "None saved" in card and "Not run: `melafast audit" in card and "could not be read" in card
    assert np.isfinite(float(re.search(r"ROC AUC \*\*(\d\.\d+)\*\*", card).group(1)))
    res = invoke("card", "--run", tmp_path / "nowhere")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1


def test_the_card_names_its_data_source_licence_prevalence_and_negatives(tiny_run, sample_dir, tmp_path):
    import pandas as pd

    from melafast.evaluate.card import data_source

    run = shutil.copytree(tiny_run, tmp_path / "run")
    res = invoke("card", "--run", run, "--bootstrap", 20)
    assert res.exit_code == 0, res.output
    card = (run / "MODEL_CARD.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["datasets"] == ["melafast synthetic sample"] and meta["license"] == "other"
    data = _section(card.split("---\n", 2)[2], "Training data")
    train = pd.read_csv(sample_dir / "train.csv")
    assert f"melanomas are {train['target'].mean():.1%} of the training images" in data
    res = invoke("card", "--run", run, "--bootstrap", 20, "--dataset", "Clinic X 2026", "--license", "cc-by-4.0")
    meta = yaml.safe_load((run / "MODEL_CARD.md").read_text().split("---\n")[1])
    assert meta["datasets"] == ["Clinic X 2026"] and meta["license"] == "cc-by-4.0"
    # recognised by their names: ISIC 2020, HAM10000 (its lesions), ISIC 2024 (its columns); else unknown
    isic = pd.DataFrame(dict(image_name=["ISIC_0000001"], patient_id=["IP_0000001"]))
    assert data_source(isic)["name"] == "SIIM-ISIC 2020" and "doi:10.34970/2020-ds01" in data_source(isic)["citation"]
    ham = pd.DataFrame(dict(image_name=["ISIC_0027419"], lesion_id=["HAM_0000118"], patient_id=["HAM_0000118"]))
    assert data_source(ham)["hf_license"] == "cc-by-nc-sa-4.0"
    assert data_source(ham.drop(columns="lesion_id"))["name"] == "HAM10000"
    assert data_source(pd.DataFrame(dict(image_name=["x1"])))["name"] == "unknown"
    # the diagnoses of the negatives, when the data names them
    from melafast.evaluate.card import _negatives

    rows = pd.DataFrame(dict(target=[0, 0, 0, 1], diagnosis=["nevus", "nevus", "seborrheic keratosis", "melanoma"]))
    assert _negatives(rows) == ["- The lesions that are not melanoma: nevus 67%, seborrheic keratosis 33% (of 3 images)."]


def test_the_card_and_report_summary_name_the_benign_diagnoses_the_point_flags(tiny_run, sample_dir, tmp_path):
    "Per-diagnosis specificity at the point in force: in the card's limits and table, and in the report's summary."
    from melafast.evaluate.operating import crossfit_decisions

    run = shutil.copytree(tiny_run, tmp_path / "run")
    data = shutil.copytree(sample_dir, tmp_path / "data")
    train = pd.read_csv(data / "train.csv")
    oof = pd.read_csv(run / "oof.csv")
    # the benign lesions the run scores highest are keratoses, the others nevi
    high = set(oof.loc[(oof["target"] == 0) & (oof["pred"] >= oof.loc[oof["target"] == 0, "pred"].median()),
                       "image_name"])
    train["diagnosis"] = np.where(train["target"] == 1, "melanoma",
                                  np.where(train["image_name"].isin(high), "seborrheic keratosis", "nevus"))
    train.to_csv(data / "train.csv", index=False)
    assert invoke("operating-point", "--run", run, "--goal", "sens90", "--bootstrap", 20).exit_code == 0
    res = invoke("card", "--run", run, "--data", data, "--bootstrap", 20)
    assert res.exit_code == 0, res.output
    body = (run / "MODEL_CARD.md").read_text().split("---\n", 2)[2]
    diag = oof["image_name"].map(train.set_index("image_name")["diagnosis"]).to_numpy()
    decision = crossfit_decisions(oof["target"], oof["pred"], oof["fold"], "sens90")[0]
    share = {d: decision[diag == d].mean() for d in ("seborrheic keratosis", "nevus", "melanoma")}
    assert share["seborrheic keratosis"] > share["nevus"]  # the planted pattern: keratoses flagged more
    limits = _section(body, "Intended use and limits")
    line = next(ln for ln in limits.splitlines() if "benign diagnoses it calls melanoma" in ln)
    assert (f"seborrheic keratosis {share['seborrheic keratosis']:.0%} of {(diag == 'seborrheic keratosis').sum()}, "
            f"nevus {share['nevus']:.0%} of {(diag == 'nevus').sum()}; it calls {share['melanoma']:.0%} of melanomas"
            in line), line
    table = {r[0]: r for r in _rows(_section(body, "Operating point"))}
    assert float(table["nevus"][-1]) == round(share["nevus"], 3)
    assert float(table["melanoma"][-1]) == round(share["melanoma"], 3)
    # the report's summary says the same
    assert invoke("report", "--run", run, "--data", data, "--workers", 0, "--bootstrap", 20, "--errors", 0,
                  "--no-importance", "--no-audit").exit_code == 0
    summary = (run / "report.html").read_text().split('id="curves"')[0]
    assert f"nevus {share['nevus']:.0%} of {(diag == 'nevus').sum()}" in summary
