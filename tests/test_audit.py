"""The shortcut audit: each artefact drawn as recorded, and the audit proven able to fail: a model trained where ink
marks the melanomas is flagged for ink, one trained on the same images without the ink is not."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import _cli_args, _once
from typer.testing import CliRunner

from melafast.evaluate.audit import ARTEFACTS, draw_artefact, in_grey
from melafast.cli import app
from melafast.errors import MelafastError

# a small net that learns from random init in a few epochs at 32 px (mobilenet learns almost nothing there)
AUDIT_RUN = dict(arch="resnet10t", size=32, bs=16, epochs=5, folds=2, lr="1e-2", pretrained=False, workers=0, tta=1,
                 meta=False)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _plant_ink(data):
    """Mark every melanoma of the dataset `data` with a surgical-ink stroke: a straight violet line across the image,
    placed at random (not the audit's own arc: the audit has to recognise ink it did not draw)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    table = pd.read_csv(data / "train.csv")
    for name in table.loc[table["target"] == 1, "image_name"]:
        path = data / "jpeg" / "train" / f"{name}.jpg"
        img = Image.open(path).convert("RGB")
        (x0, y0), (x1, y1) = rng.uniform(2, 20, 2), rng.uniform(44, 62, 2)
        if rng.random() < 0.5:
            x0, x1 = x1, x0
        ImageDraw.Draw(img).line([x0, y0, x1, y1], fill=(120, 60, 170), width=3)
        img.save(path, quality=95)


@pytest.fixture(scope="session")
def audit_runs(shared_root):
    """(inked run, clean run): the same 160 synthetic images, the melanomas of the first marked with ink."""
    from melafast.data import make_sample

    def make(inked):
        def build(path):
            data = make_sample(path / "data", n_train=160, n_test=4, seed=3, px=64)
            if inked:
                _plant_ink(data)
            res = CliRunner().invoke(app, _cli_args({"data": data, **AUDIT_RUN, "out": path / "run"}),
                                     catch_exceptions=False)
            assert res.exit_code == 0, res.output
        return _once(shared_root, f"audit-{'inked' if inked else 'clean'}", build) / "run"

    return make(True), make(False)


def test_the_audit_flags_a_planted_ink_shortcut_and_not_a_clean_model(audit_runs, tmp_path):
    inked, clean = audit_runs
    tables = {}
    for name, run in (("inked", inked), ("clean", clean)):
        out = tmp_path / f"{name}.html"
        res = invoke("audit", "--run", run, "--out", out, "--bootstrap", 300, "--workers", 0)
        assert res.exit_code == 0, res.output
        tables[name] = pd.read_csv(out.with_suffix(".csv")).set_index("artefact")
        assert list(tables[name].index) == list(ARTEFACTS)
        page = out.read_text()
        assert page.count('src="data:image/png;base64,') == 2 and "What was drawn" in page
    ink, ink_clean = tables["inked"].loc["ink"], tables["clean"].loc["ink"]
    assert ink["flagged"] and not ink_clean["flagged"]
    # why: ink's colour alone raises the inked model's benign scores, not the clean model's
    assert ink["benign change, colour"] > 0.1 and ink["colour lo"] > 0.05
    assert ink_clean["benign change, colour"] < 0.05
    print(pd.concat(tables, names=["run"]).round(3).to_string())
    assert not tables["inked"].loc["patch", "flagged"] and not tables["clean"].loc["patch", "flagged"]


def test_artefacts_are_drawn_as_recorded():
    img = np.full((64, 64, 3), (200, 160, 140), np.uint8)
    for name in ARTEFACTS:
        a = draw_artefact(img, name, np.random.default_rng([0, 1]))
        b = draw_artefact(img, name, np.random.default_rng([0, 1]))
        assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)  # seeded: reproducible
        changed = np.any(a != img, axis=-1).mean()
        assert 0.01 < changed < 0.8, (name, changed)  # visible, and not the whole image
        assert not np.array_equal(a, draw_artefact(img, name, np.random.default_rng([0, 2])))  # placed per image
    ink = draw_artefact(img, "ink", np.random.default_rng(0))
    marks = np.any(ink != img, axis=-1)
    assert (ink[marks][:, 2] > ink[marks][:, 1]).all()  # violet: more blue than green
    grey = in_grey(img, ink)
    assert np.array_equal(grey[~marks], img[~marks]) and (grey[marks].max(1) == grey[marks].min(1)).all()
    dark = draw_artefact(img, "vignette", np.random.default_rng(0))
    assert dark[0, 0].sum() < 60 and np.array_equal(dark[32, 32], img[32, 32])  # black corners, the centre kept
    with pytest.raises(MelafastError, match="unknown artefact 'tattoo'"):
        draw_artefact(img, "tattoo", np.random.default_rng(0))


def test_audit_bad_input_is_one_error_line(tiny_run, tmp_path):
    res = invoke("audit", "--run", tiny_run, "--artefact", "ink", "--artefact", "tattoo", "--out", tmp_path / "a.html")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "unknown artefact 'tattoo'" in res.stderr
    assert "choose from ink, ruler, vignette, hair, patch" in res.stderr
    res = invoke("audit", "--run", tmp_path / "nowhere")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    no_oof = shutil.copytree(tiny_run, tmp_path / "no_oof")
    (no_oof / "oof.csv").unlink()
    res = invoke("audit", "--run", no_oof)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "has no oof.csv" in res.stderr
    res = invoke("audit", "--run", tiny_run, "--tta", 3)
    assert res.exit_code == 1 and "--tta must be 1, 2, 4 or 8" in res.stderr


def test_the_report_reuses_a_saved_audit_of_the_same_models(tiny_run, tmp_path, monkeypatch):
    import os

    from melafast.evaluate import audit as audit_mod

    run = shutil.copytree(tiny_run, tmp_path / "run")
    res = invoke("audit", "--run", run, "--bootstrap", 20, "--workers", 0, "--artefact", "ink")
    assert res.exit_code == 0, res.output
    saved = pd.read_csv(run / "audit.csv")

    def not_again(*args, **kwargs):
        raise AssertionError("the audit ran again")

    monkeypatch.setattr(audit_mod, "shortcut_audit", not_again)
    res = invoke("report", "--run", run, "--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance")
    assert res.exit_code == 0, res.output
    assert f"reusing {run / 'audit.csv'}" in res.output
    page = (run / "report.html").read_text()
    assert "shown as it was run" in page and "--rerun-audit" in page
    assert pd.read_csv(run / "report_figures" / "audit.csv")["artefact"].tolist() == saved["artefact"].tolist()
    # asked to, or when a model changed after the audit, it runs again
    for args in (["--rerun-audit"], []):
        if not args:
            (run / "audit.csv").unlink()
            (run / "report_figures" / "audit.csv").unlink()
            monkeypatch.undo()
            invoke("audit", "--run", run, "--bootstrap", 20, "--workers", 0, "--artefact", "ink")
            monkeypatch.setattr(audit_mod, "shortcut_audit", not_again)
            weights = next(run.glob("fold0/model.*"))
            later = (run / "audit.csv").stat().st_mtime + 10
            os.utime(weights, (later, later))  # the fold model was rewritten after that audit
        with pytest.raises(AssertionError, match="the audit ran again"):
            invoke("report", "--run", run, "--workers", 0, "--bootstrap", 20, "--errors", 0, "--no-importance", *args)
