"""`melafast compare` / `compare_runs`: paired differences on the images every run scored, and its refusals."""

import base64
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from melafast.cli import app
from melafast.metrics import paired_bootstrap, pauc

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_paired_bootstrap_is_zero_for_one_model_and_antisymmetric():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    a = rng.random(300) + 0.6 * y
    b = a + rng.normal(0, 0.3, 300)
    same = paired_bootstrap(y, a, a.copy(), groups=np.arange(300) // 3, n_boot=100)
    assert (same[["diff", "lo", "hi"]].abs().to_numpy() < 1e-12).all()  # a model against itself: exactly nothing
    ab = paired_bootstrap(y, a, b, groups=np.arange(300) // 3, n_boot=200)
    ba = paired_bootstrap(y, b, a, groups=np.arange(300) // 3, n_boot=200)
    assert ab["diff"].to_numpy() == pytest.approx(-ba["diff"].to_numpy())
    assert ab["lo"].to_numpy() == pytest.approx(-ba["hi"].to_numpy())  # the same draws, seen from the other side
    assert ab.loc[0, "a"] == pytest.approx(roc_auc_score(y, a)) and ab.loc[1, "b"] == pytest.approx(pauc(y, b))
    assert (ab["lo"] <= ab["diff"]).all() and (ab["diff"] <= ab["hi"]).all()
    # pairing cancels what the two share: the paired interval of a small change is far narrower than the spread of
    # either model's own AUC
    from melafast.metrics import bootstrap_auc

    ci_a = bootstrap_auc(y, a, np.arange(300) // 3, n_boot=200)
    near = paired_bootstrap(y, a, a + rng.normal(0, 0.02, 300), groups=np.arange(300) // 3, n_boot=200)
    assert near.loc[0, "hi"] - near.loc[0, "lo"] < 0.3 * (ci_a["hi"] - ci_a["lo"])


def _numbers(line):
    return [float(x) for x in re.findall(r"[+-]?\d+\.\d+", line)]


def test_compare_two_runs_on_their_shared_images(tiny_run, make_run, tmp_path):
    other = make_run(tta=2)  # the same folds, another TTA
    out = tmp_path / "cmp.html"
    res = invoke("compare", tiny_run, other, "--out", out, "--bootstrap", 200)
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(tiny_run / "oof.csv"), pd.read_csv(other / "oof.csv")
    auc_a, auc_b = roc_auc_score(a["target"], a["pred"]), roc_auc_score(b["target"], b["pred"])
    lines = res.output.splitlines()
    assert f"compared on {len(a)} out-of-fold images" in res.output and "patients" in res.output
    row_a, row_b = (next(line for line in lines if line.startswith(r.name[-24:])) for r in (tiny_run, other))
    assert _numbers(row_a)[:2] == pytest.approx([auc_a, pauc(a["target"], a["pred"])], abs=1e-4)
    assert _numbers(row_b)[0] == pytest.approx(auc_b, abs=1e-4)
    diff = next(line for line in lines if " AUC " in line and line.startswith(other.name))
    value, lo, hi = _numbers(diff)[:3]
    assert value == pytest.approx(auc_b - auc_a, abs=1e-4) and lo <= value <= hi
    assert "settings that differ: tta: 1 / 2" in res.output
    page = out.read_text()
    assert [s for s in re.findall(r'<section id="(\w+)"', page)] == ["summary", "metrics", "roc", "subgroups",
                                                                      "settings"]
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert (tmp_path / "cmp_figures" / "roc.png").is_file()


def test_compare_says_when_folds_differ_and_uses_only_shared_rows(tiny_run, tmp_path):
    from melafast import compare_runs

    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    oof = pd.read_csv(moved / "oof.csv")
    oof["fold"] = 1 - oof["fold"]  # every image in the other fold
    oof.iloc[5:].to_csv(moved / "oof.csv", index=False)  # and five images it never scored
    got = compare_runs([tiny_run, moved], out=tmp_path / "c.html", n_boot=50, log=lambda *_: None)
    assert len(got["rows"]) == len(oof) - 5
    assert any(n.startswith("The folds differ: 59 of the 59 shared images") for n in got["notes"])
    assert any("scored 64 out-of-fold images; the comparison uses the 59" in n for n in got["notes"])
    assert (got["differences"]["diff"].abs() < 1e-12).all()  # the same predictions: no difference


def test_compare_refuses_runs_without_shared_images(tiny_run, tmp_path):
    stranger = tmp_path / "stranger"
    shutil.copytree(tiny_run, stranger)
    oof = pd.read_csv(stranger / "oof.csv")
    oof["image_name"] = "OTHER_" + oof["image_name"]
    oof.to_csv(stranger / "oof.csv", index=False)
    res = invoke("compare", tiny_run, stranger, "--out", tmp_path / "x.html")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "share no out-of-fold image" in res.stderr
    res = invoke("compare", "--run", tiny_run, "--run", stranger, "--out", tmp_path / "x.html")  # as every command
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "share no out-of-fold image" in res.stderr
    for args in ([tiny_run], ["--run", tiny_run]):
        res = invoke("compare", *args, "--out", tmp_path / "x.html")
        assert res.exit_code == 1 and "at least two run folders: --run A --run B" in res.stderr
    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_run, flipped)
    oof = pd.read_csv(flipped / "oof.csv")
    oof["target"] = 1 - oof["target"]
    oof.to_csv(flipped / "oof.csv", index=False)
    res = invoke("compare", tiny_run, flipped, "--out", tmp_path / "x.html")
    assert res.exit_code == 1 and "disagree on the label of 64 shared images" in res.stderr


def test_predict_help_lists_its_output_columns():
    res = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    for column in ("image_name", "pred (the melanoma probability", "decision (1: melanoma)", "votes", "image_ok"):
        assert column in text, column
