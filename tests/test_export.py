"""`melafast export` and `melafast.onnx`: ONNX fold models that predict what `load_predictor` predicts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import HAM, needs_ham
from typer.testing import CliRunner

from melafast.cli import app

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def exported(make_run, tmp_path_factory):
    "The TTA x2 shared run with an operating point, exported."
    from melafast.evaluate.operating import save_operating_point

    base = tmp_path_factory.mktemp("export")
    run = shutil.copytree(make_run(tta=2), base / "run")
    save_operating_point(run, "sens90", n_boot=20)
    res = invoke("export", "--run", run, "--out", base / "onnx")
    assert res.exit_code == 0, res.output
    return run, base / "onnx"


def _torch_preds(run, images, meta=None):
    from melafast.inference import load_predictor

    return load_predictor(run).predict_frame(images, meta=meta, progress=False)


def test_exported_models_are_valid_onnx_with_dynamic_batch(exported):
    import onnx
    import onnxruntime as ort

    run, out = exported
    manifest = json.loads((out / "melafast_export.json").read_text())
    assert manifest["tta"] == 2 and len(manifest["models"]) == 2 and manifest["operating_point"]["operating_point"] == "sens90"
    for m in manifest["models"]:
        model = onnx.load(str(out / m["file"]))
        onnx.checker.check_model(model, full_check=True)
        session = ort.InferenceSession(str(out / m["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image", "meta"]
        n_meta = session.get_inputs()[1].shape[1]
        for n in (1, 5):  # any batch size
            got = session.run(None, {"image": np.random.rand(n, 3, 32, 32).astype(np.float32),
                                     "meta": np.zeros((n, n_meta), np.float32)})[0]
            assert got.shape == (n,) and ((got >= 0) & (got <= 1)).all()


def test_the_runtime_predicts_what_load_predictor_predicts(exported, sample_dir, tmp_path):
    from melafast.onnx import load

    run, out = exported
    images = sample_dir / "jpeg" / "test"
    runtime = load(out)
    meta = pd.read_csv(sample_dir / "test.csv").astype(object)
    meta.loc[0, "sex"], meta.loc[1, "age_approx"], meta.loc[2, "anatom_site_general_challenge"] = "F", "", "n/a"
    meta.loc[3, "anatom_site_general_challenge"] = "a site never seen in training"
    meta.to_csv(tmp_path / "meta.csv", index=False)
    for m in (None, tmp_path / "meta.csv"):  # without metadata (every field unknown) and with it
        want = _torch_preds(run, images, m)
        got = pd.DataFrame(runtime.predict(images, meta=None if m is None else str(m)))
        assert got["image_name"].tolist() == want["image_name"].tolist()
        assert np.abs(got["pred"].to_numpy() - want["pred"].to_numpy()).max() < 1e-4
        assert got["decision"].tolist() == want["decision"].tolist() and got["votes"].tolist() == want["votes"].tolist()
    without, with_meta = (pd.DataFrame(runtime.predict(images, meta=m))["pred"] for m in (None, str(tmp_path / "meta.csv")))
    assert np.abs(without - with_meta).max() > 1e-3  # the metadata reaches the exported models
    # the command line writes the same table
    res = subprocess.run([sys.executable, "-m", "melafast.onnx", str(out), str(images), "--out", str(tmp_path / "p.csv")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert np.allclose(pd.read_csv(tmp_path / "p.csv")["pred"], _torch_preds(run, images)["pred"], atol=1e-4)
    # a drift is caught: another TTA gives other numbers
    runtime.tta = 1
    assert np.abs(pd.DataFrame(runtime.predict(images))["pred"].to_numpy() - want["pred"].to_numpy()).max() > 1e-4



def test_the_runtime_decides_by_a_calibrated_points_scale(exported, sample_dir):
    "A point chosen on a calibration set (`melafast calibrate`) decides by the fold mean, in torch and in ONNX alike."
    from melafast.onnx import load
    from melafast.runfolder import RunFolder

    run, out = exported
    images = sample_dir / "jpeg" / "test"
    folder, runtime = RunFolder(run), load(out)
    saved = folder.operating_point()
    try:
        preds = _torch_preds(run, images)["pred"]
        point = dict(saved.to_dict(), scale="ensemble", threshold=float(np.median(preds)))
        folder.write_operating_point(point)
        runtime.operating_point = point  # what the manifest holds when the run is exported after calibrating
        want, got = _torch_preds(run, images), pd.DataFrame(runtime.predict(images))
        assert got["decision"].tolist() == want["decision"].tolist() == (preds >= point["threshold"]).astype(int).tolist()
        assert 0 < want["decision"].sum() < len(want)
        assert "votes" not in got.columns and "votes" not in want.columns  # the fold mean is the reason, not a vote
    finally:
        folder.write_operating_point(saved)


@needs_ham
def test_the_runtime_reads_real_jpegs_as_melafast_does(exported, tmp_path):
    "Real 600 x 450 dermoscopy JPEGs (decoded at a reduced scale, squashed to the input size), with their metadata."
    from melafast.onnx import load

    run, out = exported
    table = pd.read_csv(HAM / "train.csv").groupby("target").head(8)
    paths = [HAM / "images" / f"{n}.jpg" for n in table["image_name"]]
    want = _torch_preds(run, paths, table)
    got = pd.DataFrame(load(out).predict(paths, meta=table.astype(object).where(table.notna(), None).to_dict("records")))
    assert np.abs(got["pred"].to_numpy() - want["pred"].to_numpy()).max() < 1e-4


def test_export_refuses_bad_input(exported, tiny_run, tmp_path):
    run, out = exported
    res = invoke("export", "--run", run, "--out", out)  # not empty
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "is not an empty folder" in res.stderr
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(tiny_run / "config.json", empty / "config.json")
    res = invoke("export", "--run", empty, "--out", tmp_path / "x")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "holds no trained model" in res.stderr
    from melafast.onnx import ExportError, load

    with pytest.raises(ExportError, match="not an exported run"):
        load(tmp_path)
    with pytest.raises(ExportError, match="sex must be male, female"):
        load(out).predict(tiny_run.parent / "sample" / "jpeg" / "test", meta=[{"image_name": "SYNTH_000064",
                                                                                "sex": "yes"}])


def test_the_runtime_without_onnxruntime_says_what_to_install(exported, monkeypatch):
    import sys

    from melafast.onnx import ExportError, load

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed: importing it fails
    with pytest.raises(ExportError, match=r"needs onnxruntime: pip install onnxruntime \(or melafast\[deploy\]\)"):
        load(exported[1])
