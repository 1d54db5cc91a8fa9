"""Every surface gives `predict`'s answer: for each kind of run and each shape of input, `melafast predict`,
`load_predictor`, `melafast submit`, `serve`'s API and the exported ONNX runtime agree within 1e-4, or the surface
refuses with one line naming why. The runs are the ones the suite already trains (conftest's shared runs)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import invoke

TOL = 1e-4
N_IMAGES = 6  # images per input shape (the serve API scores the first 3)


def _given(run) -> list:
    "The fields a user gives to this run's models (sex, age, site, declared columns), from its first fold."
    from melafast.inference import load_predictor

    predictor = load_predictor(run)
    procs = [p.meta_proc for p in predictor.predictors if p.meta_proc is not None]
    return procs[0].given_columns if procs else []


def _images_2020(sample_dir, tmp_path):
    "A folder of test images of the 2020 sample, and their rows of test.csv."
    folder = tmp_path / "images"
    folder.mkdir()
    table = pd.read_csv(sample_dir / "test.csv", dtype={"image_name": str}).head(N_IMAGES)
    for name in table["image_name"]:
        shutil.copy(sample_dir / "jpeg" / "test" / f"{name}.jpg", folder)
    return folder, table


def _images_2024(sample_2024, tmp_path):
    "Test images of the 2024 sample taken out of its HDF5 store as JPEG files, and their metadata rows."
    import h5py

    folder = tmp_path / "images"
    folder.mkdir()
    table = pd.read_csv(sample_2024 / "test-metadata.csv", dtype={"isic_id": str}).head(N_IMAGES)
    with h5py.File(sample_2024 / "test-image.hdf5") as f:
        for name in table["isic_id"]:
            (folder / f"{name}.jpg").write_bytes(f[name][()].tobytes())
    return folder, table  # keyed by isic_id, as the 2024 tables are


def _shapes(table: pd.DataFrame, given: list) -> dict:
    "The shapes of input users bring: name -> metadata table (None: images only)."
    key = "isic_id" if "isic_id" in table.columns else "image_name"
    shapes = {"full metadata": table, "image_name + patient_id": table[[key, "patient_id"]], "none": None}
    if given:
        shapes["one field missing"] = table.drop(columns=[given[0]], errors="ignore")
    if len(given) > 1:
        shapes["two fields missing"] = table.drop(columns=given[:2], errors="ignore")
    return shapes


def _predict_cli(run, images, meta, tmp_path) -> pd.Series:
    args = ["predict", "--run", run, "--images", images, "--workers", 0, "--out", tmp_path / "p.csv"]
    if meta is not None:
        meta.to_csv(tmp_path / "meta.csv", index=False)
        args += ["--meta", tmp_path / "meta.csv"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return pd.read_csv(tmp_path / "p.csv", dtype={"image_name": str}).set_index("image_name")["pred"], res.output


def _load_predictor(run, images, meta, tmp_path) -> pd.Series:
    import warnings

    from melafast.inference import load_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-metadata note: predict's output is checked for it
        frame = load_predictor(run).predict_frame(images, meta, progress=False, num_workers=0)
    return frame.set_index("image_name")["pred"]


def _submit(run, images, meta, tmp_path) -> pd.Series:
    "A dataset folder whose test.csv is this input (images only: names alone), submitted."
    names = sorted(p.stem for p in images.iterdir())
    data = tmp_path / "data"
    (data / "jpeg").mkdir(parents=True)
    (data / "jpeg" / "test").symlink_to(images)
    table = meta if meta is not None else pd.DataFrame({"image_name": names})
    table.to_csv(data / "test.csv", index=False)
    res = invoke("submit", "--run", run, "--data", data, "--workers", 0, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    return sub.set_index(sub.columns[0])["target"].astype(float)


def _serve(service, images, meta, given) -> pd.Series:
    "The serve API (what POST /api/predict runs) on the first 3 images, with the row's given fields."
    rows = {} if meta is None else meta.set_index(meta.columns[0]).to_dict("index")
    out = {}
    for path in sorted(images.iterdir())[:3]:
        row = rows.get(path.stem, {})
        fields = {c: row[c] for c in given if c in row and not pd.isna(row[c])}
        out[path.stem] = service.predict(path.read_bytes(), path.stem, **{k: str(v) for k, v in fields.items()})["pred"]
    return pd.Series(out)


def _onnx(runtime, images, meta) -> pd.Series:
    rows = None if meta is None else meta.astype(object).where(meta.notna(), None).to_dict("records")
    return pd.DataFrame(runtime.predict(images, rows)).set_index("image_name")["pred"]


def _agree(name, want: pd.Series, got: pd.Series):
    got = got.astype(float)
    assert set(got.index) <= set(want.index), name
    diff = float(np.abs(want.loc[got.index].to_numpy() - got.to_numpy()).max())
    assert diff <= TOL, f"{name} differs from predict by {diff:.2e}"


KINDS = {  # kind of run -> (make_run settings or a fixture's name, layout)
    "metadata, TTA x1": (dict(), "2020"),
    "metadata, TTA x2": (dict(tta=2), "2020"),
    "metadata, TTA x8 (the main job)": ("main_job", "2020"),
    "--no-meta": (dict(seed=2, meta=False), "2020"),
    "--extra-meta": (dict(extra_meta=True, fold=0), "2020"),
    "--keep best": (dict(keep="best", epochs=3), "2020"),
    "--color-constancy 6, --group-by sex": ("constancy", "2020"),
    "--target diagnosis": ("diagnosis", "2020"),
    "--cat/--cont, ISIC 2024": ("run_2024", "2024"),
    "--patient-features, ISIC 2024": ("run_2024_patient", "2024"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_surface_gives_predicts_answer(kind, request, make_run, sample_dir, tmp_path):
    from melafast.errors import MelafastError
    from melafast.deploy.export import export_run
    from melafast.onnx import load
    from melafast.deploy.service import Service

    how, layout = KINDS[kind]
    if isinstance(how, dict):
        run = make_run(**how)
    elif how == "diagnosis":
        run = make_run(data=request.getfixturevalue("sample_diagnosis"), target="diagnosis")
    elif how == "constancy":
        run = request.getfixturevalue("constancy_run")
    elif how == "main_job":  # README command 1, trained once for tests/test_validation.py too
        run, sample_dir = request.getfixturevalue(how)
    else:
        run = request.getfixturevalue(how)[0]
    images, table = (_images_2020(sample_dir, tmp_path) if layout == "2020" else
                     _images_2024(request.getfixturevalue("sample_2024"), tmp_path))
    given = _given(run)
    try:  # surfaces that see one image at a time: they serve the run, or refuse it in one line
        service = Service(run, device="cpu")
    except MelafastError as e:
        service, why = None, str(e)
        assert "\n" not in why and ("--extra-meta" in why or "--patient-features" in why)
    try:
        runtime = load(export_run(run, tmp_path / "onnx", log=lambda m: None))
    except MelafastError as e:
        runtime = None
        assert "\n" not in str(e) and ("--extra-meta" in str(e) or "--patient-features" in str(e))
    assert (service is None) == (runtime is None) == any(f in kind for f in ("--extra-meta", "--patient-features"))
    if service is not None:  # its form asks for the run's own fields, each category list the one training saw
        assert [f["name"] for f in service.fields] == given
        for f in service.fields:
            vocab = {v for m in service.models for v in m.meta_proc.vocab.get(f["name"], [])}
            assert (f["kind"] == "category") == bool(vocab) and set(f.get("choices", [])) == vocab
    answers = {}
    for shape, meta in _shapes(table, given).items():
        work = tmp_path / shape.replace(" ", "_").replace("+", "and")
        work.mkdir()
        want, output = _predict_cli(run, images, meta, work)
        answers[shape] = want
        _agree(f"{kind}, {shape}: load_predictor", want, _load_predictor(run, images, meta, work))
        _agree(f"{kind}, {shape}: submit", want, _submit(run, images, meta, work))
        if service is not None:
            _agree(f"{kind}, {shape}: serve", want, _serve(service, images, meta, given))
        if runtime is not None:
            _agree(f"{kind}, {shape}: ONNX runtime", want, _onnx(runtime, images, meta))
        if given and shape in ("image_name + patient_id", "none"):  # predict says so, counting with the model's rule
            assert f"{len(want)} of {len(want)} images have no metadata" in output, output
    if given:  # no given field: the model's missing-metadata path, whatever else the table holds (a patient id)
        _agree(f"{kind}: image_name + patient_id vs images only", answers["none"], answers["image_name + patient_id"])
        assert np.abs(answers["full metadata"] - answers["none"]).max() > 0  # the metadata reaches the model


def test_a_run_saved_when_n_images_counted_as_a_field_routes_by_the_given_fields(make_run, sample_dir, tmp_path):
    """Models saved before the rule counted `n_images` (from the table's patient ids) among the fields that decide
    the image head: read today, a row with a patient id and no given field takes the image head, as predict says."""
    import json

    from melafast.data import MetaProcessor

    run = shutil.copytree(make_run(extra_meta=True, fold=0), tmp_path / "run")
    cfg_file = run / "fold0" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    proc = MetaProcessor.from_dict(cfg["meta_proc"])
    old = sorted([proc.slots()["n_images"][1], *proc.patient_flags()])
    cfg["model"]["blank_flags"] = old  # what melafast wrote then
    cfg_file.write_text(json.dumps(cfg))
    images, table = _images_2020(sample_dir, tmp_path)
    ids, _ = _predict_cli(run, images, table[["image_name", "patient_id"]], tmp_path)
    alone, _ = _predict_cli(run, images, None, tmp_path)
    _agree("patient ids only vs images only", alone, ids)


def test_every_surface_gives_the_same_recalibrated_probability(tiny_run, sample_dir, tmp_path):
    "A run with `melafast recalibrate`: pred_calibrated from predict, the library, serve and the ONNX runtime."
    import json

    run = shutil.copytree(tiny_run, tmp_path / "run")
    res = invoke("recalibrate", "--run", run)
    assert res.exit_code == 0, res.output
    from melafast.deploy.export import export_run
    from melafast.deploy.service import Service
    from melafast.inference import load_predictor
    from melafast.onnx import load

    r = json.loads((run / "recalibration.json").read_text())
    oof = pd.read_csv(run / "oof.csv")
    assert r["source"] == "oof" and r["images"] == len(oof) and r["prevalence"] == pytest.approx(oof["target"].mean())
    images = sample_dir / "jpeg" / "test"
    res = invoke("predict", "--run", run, "--images", images, "--workers", 0, "--prevalence", 0.02,
                 "--out", tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    p = pd.read_csv(tmp_path / "p.csv").set_index("image_name")
    z = np.log(p["pred"] / (1 - p["pred"]))
    want = 1 / (1 + np.exp(-(r["slope"] * z + r["shift"])))  # the formula, written out
    assert np.abs(p["pred_calibrated"] - want).max() < 1e-9
    assert (np.argsort(p["pred"].to_numpy()) == np.argsort(p["pred_calibrated"].to_numpy())).all()
    # the probability at 2% starts from the recalibrated one, at the share it was fitted at
    odds = want / (1 - want) * (0.02 / 0.98) / (r["prevalence"] / (1 - r["prevalence"]))
    assert np.abs(p["pred_at_prevalence"] - odds / (1 + odds)).max() < 1e-9
    frame = load_predictor(run).predict_frame(images, progress=False, num_workers=0).set_index("image_name")
    assert np.abs(frame["pred_calibrated"] - p["pred_calibrated"]).max() < 1e-4
    service = Service(run, device="cpu")
    first = sorted(images.iterdir())[0]
    got = service.predict(first.read_bytes(), first.stem)
    assert got["pred_calibrated"] == pytest.approx(p.loc[first.stem, "pred_calibrated"], abs=1e-4)
    assert service.info()["recalibration"]["slope"] == pytest.approx(r["slope"])
    runtime = load(export_run(run, tmp_path / "onnx", log=lambda m: None))
    onnx = pd.DataFrame(runtime.predict(images)).set_index("image_name")
    assert np.abs(onnx["pred_calibrated"] - p.loc[onnx.index, "pred_calibrated"]).max() < 1e-4
    # the pages say so
    assert invoke("card", "--run", run, "--bootstrap", 20).exit_code == 0
    assert f"{r['ece_before']:.4f} -> {r['ece_after']:.4f} cross-fitted there" in (run / "MODEL_CARD.md").read_text()
