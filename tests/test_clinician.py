"""What a clinician reads from `predict`: the fold models' spread, a probability at a stated prevalence, and a
warning for metadata values the run never saw (a misspelt or new site is neither the site it means nor missing)."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from melafast.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_predict_gives_the_spread_and_a_probability_at_a_stated_prevalence(make_run, sample_dir, tmp_path):
    from melafast.metrics import at_prevalence
    from melafast.runfolder import RunFolder

    run = make_run(tta=2)
    images = sample_dir / "jpeg" / "test"
    res = invoke("predict", "--run", run, "--images", images, "--workers", 0, "--prevalence", 0.02, "--out",
                 tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    got = pd.read_csv(tmp_path / "p.csv")
    assert (got["pred_min"] <= got["pred"] + 1e-9).all() and (got["pred"] <= got["pred_max"] + 1e-9).all()
    assert (got["pred_max"] - got["pred_min"]).max() > 0  # two fold models do not agree to the last digit
    info = RunFolder(run).info()
    trained = info.n_melanoma / info.n_train
    assert np.allclose(got["pred_at_prevalence"], at_prevalence(got["pred"], trained, 0.02))
    assert (got["pred_at_prevalence"] < got["pred"]).all()  # 2% is far below the sample's share of melanomas
    assert f"the share the models learnt from, {trained:.1%}" in res.output
    for bad in (0, 1.5):
        res = invoke("predict", "--run", run, "--images", images, "--prevalence", bad, "--out", tmp_path / "q.csv")
        assert res.exit_code == 1 and "--prevalence must be between 0 and 1" in res.stderr
    # the odds move by the ratio of the prior odds, and back
    p = np.array([0.1, 0.5, 0.9])
    assert np.allclose(at_prevalence(at_prevalence(p, 0.3, 0.02), 0.02, 0.3), p)
    assert at_prevalence(0.5, 0.5, 0.2) == pytest.approx(0.2)


def test_metadata_the_run_never_saw_is_said_not_silently_scored(make_run, sample_dir, tmp_path):
    run = make_run(tta=2)
    images = sample_dir / "jpeg" / "test"
    names = sorted(p.stem for p in images.glob("*.jpg"))[:3]
    meta = pd.DataFrame({"image_name": names, "sex": ["male", "female", "male"], "age_approx": [50, 60, 70],
                         "anatom_site_general_challenge": ["leg", "torso", "leg"]})
    meta.to_csv(tmp_path / "meta.csv", index=False)
    res = invoke("predict", "--run", run, "--images", images, "--meta", tmp_path / "meta.csv", "--workers", 0,
                 "--out", tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    assert "never saw in training: anatom_site_general_challenge 'leg' (2 images)" in res.output
    meta.assign(anatom_site_general_challenge="torso").to_csv(tmp_path / "ok.csv", index=False)
    res = invoke("predict", "--run", run, "--images", images, "--meta", tmp_path / "ok.csv", "--workers", 0,
                 "--out", tmp_path / "q.csv")
    assert res.exit_code == 0 and "never saw in training" not in res.output
    # in Python, a warning
    from melafast import load_predictor

    with pytest.warns(UserWarning, match="never saw in training"):
        load_predictor(run).predict(images, meta=meta, num_workers=0, progress=False)


COMMANDS = [["predict", "--images", "IMAGES"], ["submit"], ["calibrate", "--data", "DATA"], ["serve"], ["audit"],
            ["export", "--out", "OUT"], ["pseudo"], ["stack"]]


def test_a_run_without_models_is_refused_before_torch_loads(tiny_run, sample_dir, tmp_path):
    "Seconds of importing torch and fastai, then an error a folder listing could have given: said at once instead."
    import json
    import shutil
    import subprocess
    import sys

    empty = tmp_path / "run"
    empty.mkdir()
    shutil.copy(tiny_run / "config.json", empty / "config.json")
    calls = [[a.replace("IMAGES", str(sample_dir / "jpeg" / "test")).replace("DATA", str(sample_dir))
              .replace("OUT", str(tmp_path / "out")) for a in c[:1] + ["--run", str(empty)] + c[1:]] for c in COMMANDS]
    # a run with models and a stack, submitted with --stack against a folder that has no tables
    stacked = shutil.copytree(tiny_run, tmp_path / "stacked", ignore=shutil.ignore_patterns("*.csv", "*.html"))
    (stacked / "stack.json").write_text("{}")  # only its presence is checked before torch
    (tmp_path / "empty_data").mkdir()
    calls.append(["submit", "--run", str(stacked), "--stack", "--data", str(tmp_path / "empty_data"),
                  "--out", str(tmp_path / "s.csv")])
    # every command in one process: each must stop before anything imports torch
    code = ("import json, sys\nfrom melafast.cli import app\nout = []\n"
            "for args in json.loads(sys.argv[1]):\n    try:\n        app(args, prog_name='melafast')\n"
            "    except SystemExit as e:\n        out.append([args[0], e.code, 'torch' in sys.modules])\n"
            "print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], capture_output=True, text=True, timeout=120)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == [[c[0], 1, False] for c in calls], res.stdout + res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == len(calls) and all("holds no trained model" in e for e in errors[:-1]), res.stderr
    assert "empty_data has no test.csv (nor test-metadata.csv)" in errors[-1], res.stderr
    # each line names the command that failed, so a log of several steps says which one
    assert [e.split(": ")[1] for e in errors] == [f"melafast {c[0]}" for c in calls], res.stderr


def test_a_one_fold_run_says_its_oof_row_is_not_the_cv(make_run):
    from conftest import run_output

    out = run_output(make_run(lr="auto", fold=1, tta=2))  # shared with test_cli
    assert "note: the OOF row covers 1 of the run's 2 folds" in out and "fold(s) 0 not trained (--fold)" in out
    assert "covers" not in run_output(make_run(tta=2))  # every fold trained: no such note


def test_errors_name_the_command_that_needs_what_is_missing(tiny_run, tmp_path):
    "card and compare used to say 'the report is made from ...' about a run without out-of-fold predictions."
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "oof.csv").unlink()
    for args, who in ((["card", "--run", run], "the model card"), (["compare", "--run", run, "--run", tiny_run],
                                                                   "the comparison"),
                      (["report", "--run", run], "the report"), (["audit", "--run", run], "the audit")):
        res = invoke(*args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
        assert f"{who} is made from a run's out-of-fold predictions" in res.stderr, res.stderr
