"""Nothing is lost: atomic writes survive a kill, interrupted runs resume, the same seed gives the same run,
and prediction streams (memory does not grow with the number of images)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_ARCH, copy_run
from typer.testing import CliRunner

from melafast.train import run as run_mod
from melafast.atomic import atomic_path, write_json
from melafast.cli import app
from melafast.config import TrainConfig
from melafast.train.run import resume_run, train_run


def silent(msg):
    pass


def test_atomic_write_survives_a_kill(tmp_path):
    target = tmp_path / "submission.csv"
    target.write_text("old complete file\n")
    script = textwrap.dedent(f"""
        import time
        from melafast.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
                print("writing", flush=True)
                time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert target.read_text() == "old complete file\n"
    write_json({"new": 1}, target)  # a later write still goes through, leftovers or not
    assert json.loads(target.read_text()) == {"new": 1}


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def _cfg(sample_dir, out):
    return TrainConfig(data=str(sample_dir), arch=TINY_ARCH, size=32, bs=16, epochs=1, lr=1e-2, folds=2,
                       pretrained=False, tta=2, workers=0, out=str(out))


def _comparable(run):
    oof = pd.read_csv(run / "oof.csv").sort_values("image_name").reset_index(drop=True)
    metrics = pd.read_csv(run / "metrics.csv").drop(columns="seconds")
    return oof, metrics


@pytest.fixture(scope="module")
def full_run(make_run):
    "The session's tiny run with TTA x2, trained by `melafast train` with the settings of `_cfg` (shared with test_cli)."
    from melafast.train.run import RunResult

    path = make_run(tta=2)
    results = json.loads((path / "results.json").read_text())
    return RunResult(path, {int(k): v for k, v in results["fold_aucs"].items()}, results["oof_auc"])


def test_same_seed_same_run_on_cpu(sample_dir, full_run, tmp_path):
    again = train_run(_cfg(sample_dir, tmp_path / "again"), log=silent)
    (oof_a, met_a), (oof_b, met_b) = _comparable(full_run.path), _comparable(again.path)
    pd.testing.assert_frame_equal(oof_a, oof_b)
    pd.testing.assert_frame_equal(met_a, met_b)
    assert again.fold_aucs == full_run.fold_aucs


def test_resume_after_an_interruption(sample_dir, full_run, tmp_path, monkeypatch):
    real = run_mod._train_fold

    def interrupted_in_fold_1(df, k, *args, **kwargs):
        if k == 1:
            raise KeyboardInterrupt  # Ctrl-C while fold 1 trains
        return real(df, k, *args, **kwargs)

    cut = tmp_path / "cut"
    monkeypatch.setattr(run_mod, "_train_fold", interrupted_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(sample_dir, cut), log=silent)
    monkeypatch.undo()
    assert set(pd.read_csv(cut / "oof.csv")["fold"]) == {0} and not (cut / "results.json").exists()
    fold0_written = (cut / "fold0" / "model.safetensors").stat().st_mtime_ns

    logs = []
    resumed = resume_run(cut, workers=0, log=logs.append)
    assert any("fold(s) 0 already finished" in m for m in logs)
    assert any("fold 1 did not finish before: training it from scratch" in m for m in logs)
    assert (cut / "fold0" / "model.safetensors").stat().st_mtime_ns == fold0_written  # kept, not retrained
    assert sorted(resumed.fold_aucs) == sorted(full_run.fold_aucs) == [0, 1]
    (oof_a, met_a), (oof_b, met_b) = _comparable(full_run.path), _comparable(cut)
    pd.testing.assert_frame_equal(oof_a, oof_b)
    pd.testing.assert_frame_equal(met_a, met_b)
    assert resumed.oof_auc == pytest.approx(full_run.oof_auc)


def test_cli_resume_of_a_finished_run_trains_nothing(full_run, tmp_path):
    run = copy_run(full_run.path, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.glob("fold*/model.safetensors")}
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--workers", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "fold(s) 0, 1 already finished" in res.output and "OOF" in res.output
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("saved, expected", [({}, 100.0), ({"pretrained": False}, 1.0), ({"lr_mult": 3.0}, 3.0)])
def test_resume_keeps_the_backbone_lr_the_run_started_with(full_run, tmp_path, monkeypatch, saved, expected):
    "Runs saved before --lr-mult existed trained pretrained backbones at lr/100: resuming them must do the same."
    run = tmp_path / "old"
    run.mkdir()
    config = json.loads((full_run.path / "config.json").read_text())
    for name in ("lr_mult", "meta_dropout", "keep", "frozen_bn"):  # settings that came later
        config["settings"].pop(name)
    config["settings"].update({"pretrained": True, **saved})
    config.pop("format")  # written before run folders recorded their format
    (run / "config.json").write_text(json.dumps(config))
    seen = []
    monkeypatch.setattr(run_mod, "train_run", lambda cfg, log, resume: seen.append(cfg))
    resume_run(run, workers=0, log=silent)
    assert seen[0].lr_mult == expected
    # what was in effect before each setting existed, whatever today's defaults are
    assert (seen[0].meta_dropout, seen[0].keep, seen[0].frozen_bn) == (0.0, "best", False)


def test_run_folders_of_older_and_newer_formats(full_run, sample_dir, tmp_path):
    "A run written before the run format, the per-fold precision and the no-metadata column still predicts and "
    "submits; a run of a newer format stops with one line naming its version."
    old = copy_run(full_run.path, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config.pop("format")
    (old / "config.json").write_text(json.dumps(config))
    for k in (0, 1):
        fold = json.loads((old / f"fold{k}" / "config.json").read_text())
        for key in ("precision", "channels_last", "valid_auc_no_meta", "meta_dropout"):
            fold.pop(key)
        (old / f"fold{k}" / "config.json").write_text(json.dumps(fold))
    pd.read_csv(old / "oof.csv").drop(columns="pred_no_meta").to_csv(old / "oof.csv", index=False)
    res = CliRunner().invoke(app, ["submit", "--run", str(old), "--workers", "0", "--out", str(tmp_path / "sub.csv")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fresh = CliRunner().invoke(app, ["submit", "--run", str(full_run.path), "--workers", "0", "--out",
                                     str(tmp_path / "sub2.csv")], catch_exceptions=False)
    assert fresh.exit_code == 0 and "does not record the precision" not in fresh.output
    assert "does not record the precision it was validated with (an older run): predicting in fp32" in res.output
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], pd.read_csv(tmp_path / "sub2.csv")["target"])
    new = copy_run(full_run.path, tmp_path / "new")
    (new / "config.json").write_text(json.dumps({**json.loads((new / "config.json").read_text()), "format": 7,
                                                 "versions": {"melafast": "3.1.0"}}))
    for cmd in (["submit", "--run", str(new)], ["predict", "--run", str(new), "--images", str(sample_dir / "jpeg" / "test")],
                ["report", "--run", str(new)], ["train", "--resume", str(new)]):
        res = CliRunner().invoke(app, [*cmd, "--workers", "0"])
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, (cmd, res.output)
        assert "melafast 3.1.0 (run format 7)" in res.stderr and "upgrade melafast" in res.stderr, cmd


def test_train_passes_lr_mult_to_fine_tune(sample_dir, tmp_path, monkeypatch):
    from melafast.train.learner import MelanomaLearner

    seen, real = [], MelanomaLearner.fine_tune

    def spy(self, *args, **kwargs):
        seen.append(kwargs["lr_mult"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MelanomaLearner, "fine_tune", spy)
    cfg = TrainConfig(data=str(sample_dir), arch=TINY_ARCH, size=32, epochs=1, bs=16, lr=1e-2, lr_mult=10,
                      folds=2, fold=0, pretrained=False, tta=1, workers=0, out=str(tmp_path / "run"))
    train_run(cfg, log=silent)
    assert seen == [10]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["lr_mult"] == 10
    res = CliRunner().invoke(app, ["train", "--data", str(sample_dir), "--lr-mult", "0.5"])
    assert res.exit_code == 1 and "--lr-mult must be 1 or more" in res.stderr, res.output


def test_resume_needs_a_run_folder(tmp_path):
    res = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 1 and "nothing to resume" in res.stderr


PEAK_RSS = textwrap.dedent("""
    import resource, sys
    import numpy as np, pandas as pd
    from PIL import Image
    from melafast import load_predictor
    run, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(f"{folder}/img{i}.jpg")
        names.append(f"{folder}/img{i}.jpg")
    df = pd.DataFrame({"image_name": [f"img{i}" for i in range(n)], "fname": names, "sex": "male",
                       "age_approx": 50.0, "anatom_site_general_challenge": "torso"})
    pred = load_predictor(run).predict(df, tta=2, bs=32, num_workers=0, progress=False)
    assert pred.shape == (n,) and np.isfinite(pred).all()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def test_prediction_memory_does_not_grow_with_images(full_run, tmp_path):
    peaks = {}
    for n in (100, 1200):
        folder = tmp_path / f"imgs{n}"
        folder.mkdir()
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(full_run.path / "fold0"), str(folder), str(n)],
                             capture_output=True, text=True, check=True).stdout
        peaks[n] = int(out.split()[-1]) / 1024  # MiB
    # keeping every decoded 160 px image (75 KiB) of the 1,100 more images would add over 80 MiB
    print(f"peak RSS: {peaks[100]:.0f} MiB for 100 images, {peaks[1200]:.0f} MiB for 1,200")
    assert peaks[1200] - peaks[100] < 40, peaks
