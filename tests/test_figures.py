"""`Evaluation`, the one evaluation object: its figures agree with the metrics computed directly, and a measure added
to `HEADLINE` appears on the report, the card and the comparison of runs without another edit."""

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from melafast.cli import app
from melafast.evaluate import figures
from melafast.evaluate.figures import Evaluation, Measure
from melafast.metrics import (auc, bootstrap_auc, bootstrap_pauc, paired_bootstrap, sens_at_spec, spec_at_sens,
                              subgroup_aucs)


def _rows(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return pd.DataFrame(dict(target=y, pred=rng.random(n) + 0.7 * y, other=rng.random(n) + 0.4 * y,
                             patient_id=[f"p{i // 3}" for i in range(n)], fold=np.arange(n) % 3,
                             sex=rng.choice(["male", "female"], n), age_approx=rng.choice([25.0, 50.0, 80.0], n)))


def test_headline_figures_and_intervals_are_those_of_the_metrics():
    df = _rows()
    ev = Evaluation(df, n_boot=200)
    h = ev.headline.set_index("key")
    ci = bootstrap_auc(df["target"], df["pred"], df["patient_id"], n_boot=200)
    pci = bootstrap_pauc(df["target"], df["pred"], df["patient_id"], n_boot=200)
    assert (h.loc["auc", "value"], h.loc["auc", "lo"], h.loc["auc", "hi"]) == pytest.approx((ci["auc"], ci["lo"], ci["hi"]))
    assert (h.loc["pauc", "lo"], h.loc["pauc", "hi"]) == pytest.approx((pci["lo"], pci["hi"]))
    assert h.loc["sens_at_spec90", "value"] == pytest.approx(sens_at_spec(df["target"], df["pred"], 0.9))
    assert h.loc["spec_at_sens90", "value"] == pytest.approx(spec_at_sens(df["target"], df["pred"], 0.9))
    assert (h["lo"] <= h["value"]).all() and (h["value"] <= h["hi"]).all()
    per_fold = ev.per_fold.set_index("fold")
    for k, part in df.groupby("fold"):
        assert per_fold.loc[k, "auc"] == pytest.approx(auc(part["target"], part["pred"]))
        assert per_fold.loc[k, "images"] == len(part)
    assert ev.n_patients == df["patient_id"].nunique() and ev.n_melanomas == int(df["target"].sum())


def test_point_figures_without_a_bootstrap_have_no_interval():
    h = Evaluation(_rows(), n_boot=0).headline
    assert h["lo"].isna().all() and h["hi"].isna().all() and h["value"].notna().all()


def test_specificity_at_sensitivity_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05, 0.01])
    # finding 3 of 4 melanomas (75%) needs a threshold of 0.7: the benign 0.6 ... 0.01 are cleared, 5 of 5
    assert spec_at_sens(y, p, 0.75) == pytest.approx(1.0)
    # all 4 needs 0.2: the benign 0.6 and 0.3 are called melanoma, 3 of 5 cleared
    assert spec_at_sens(y, p, 1.0) == pytest.approx(0.6)


def test_paired_differences_are_those_of_the_paired_bootstrap():
    df = _rows()
    a, b = Evaluation(df, n_boot=150), Evaluation(df, score="other", n_boot=150)
    got = a.paired(b).set_index("key")
    ref = paired_bootstrap(df["target"], df["pred"], df["other"], df["patient_id"], n_boot=150)
    for key, row in zip(("auc", "pauc"), ref.itertuples()):
        assert (got.loc[key, "diff"], got.loc[key, "lo"], got.loc[key, "hi"]) == pytest.approx((row.diff, row.lo, row.hi))
    assert (a.paired(a)[["diff", "lo", "hi"]].abs().to_numpy() < 1e-12).all()
    with pytest.raises(ValueError):
        a.paired(Evaluation(df.iloc[:-1]))


def test_subgroups_over_any_column():
    df = _rows()
    ev = Evaluation(df, n_boot=50)
    default = ev.subgroups()
    assert set(default["variable"]) == {"sex", "age"}  # no site column here
    assert default.groupby("variable")["images"].sum().eq(len(df)).all()
    by_fold = ev.subgroups({"fold": "fold"})
    ref = subgroup_aucs(df, {"fold": df["fold"]}, n_boot=50)
    assert by_fold["auc"].to_numpy() == pytest.approx(ref["auc"].to_numpy())


def test_a_measure_added_to_the_headline_shows_on_every_page(tiny_run, tmp_path, monkeypatch):
    "The issue's promise: one Measure in HEADLINE, and the report, the card and compare all show it."
    extra = Measure("median_score", "median melanoma score", lambda t, p, w=None: float(np.median(p)), 3,
                    about="the middle of the scores")
    monkeypatch.setattr(figures, "HEADLINE", (*figures.HEADLINE, extra))
    run = shutil.copytree(tiny_run, tmp_path / "run")
    runner = CliRunner()

    def invoke(*args):
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    median = float(np.median(pd.read_csv(run / "oof.csv")["pred"]))
    invoke("report", "--run", run, "--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance", "--no-audit")
    report = (run / "report.html").read_text()
    assert "median melanoma score" in report and f"{median:.3f}" in report
    invoke("card", "--run", run, "--bootstrap", 20)
    card = (run / "MODEL_CARD.md").read_text()
    assert "Median melanoma score" in card and "median_score" in card.split("---\n")[1]  # the list and the metadata
    out = invoke("compare", tiny_run, run, "--out", tmp_path / "cmp.html", "--bootstrap", 20)
    assert "median_score" in out and "median melanoma score" in (tmp_path / "cmp.html").read_text()


def test_subgroups_served_worse_are_named():
    "A group whose AUC interval lies below the whole's is named (report summary, card limits); a group that is not, isn't."
    rng = np.random.default_rng(1)
    n = 900
    y = rng.integers(0, 2, n)
    age = rng.choice([40.0, 80.0], n)
    signal = np.where(age < 75, 1.5, 0.1)  # the model barely ranks the over-75s
    df = pd.DataFrame(dict(target=y, pred=rng.random(n) + signal * y, age_approx=age, fold=np.arange(n) % 3,
                           patient_id=[f"p{i}" for i in range(n)], sex=rng.choice(["male", "female"], n)))
    ev = Evaluation(df, n_boot=200)
    low = ev.below_whole()
    assert low[["variable", "group"]].values.tolist() == [["age", "75+"]]
    assert (low["hi"] < ev.value("auc")).all()
    from melafast.evaluate.card import _served_worse

    line = _served_worse(ev, data_note="")[0]
    assert "age 75+" in line and f"{low['auc'].iloc[0]:.3f}" in line and "male" not in line
    assert _served_worse(Evaluation(df.assign(pred=rng.random(n) + y), n_boot=200), "") == []
