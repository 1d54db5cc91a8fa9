"""Inference for new patients, GPU-fast defaults, readable logs, the hub's own offline logic, safe reruns."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH
from PIL import Image
from typer.testing import CliRunner

from melafast.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run(tiny_run, tmp_path):
    "A copy of the session's tiny run (2 folds, TTA x1) that this test may write into."
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def new_images(sample_dir, tmp_path):
    "A folder holding only the sample's test images (nothing else: no CSV, no training images), and their metadata."
    folder = tmp_path / "new"
    shutil.copytree(sample_dir / "jpeg" / "test", folder)
    meta = pd.read_csv(sample_dir / "test.csv")
    meta.to_csv(tmp_path / "meta.csv", index=False)
    return folder, tmp_path / "meta.csv"


def test_predict_a_folder_of_new_images_matches_submit(run, sample_dir, new_images, tmp_path):
    folder, meta = new_images
    sub = tmp_path / "sub.csv"
    assert invoke("submit", "--run", run, "--out", sub, "--workers", 0).exit_code == 0
    res = invoke("predict", "--run", run, "--images", folder, "--meta", meta, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output
    assert "have no metadata" not in res.output  # the table covers every image
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns) == ["image_name", "pred", "run", "pred_min", "pred_max"] and (preds["run"] == str(run)).all()
    both = preds.merge(pd.read_csv(sub), on="image_name")
    assert len(both) == 16 and np.allclose(both["pred"], both["target"], atol=1e-6)  # same models, TTA, metadata

    # the library: the run's fold ensemble and TTA, from a folder or from file paths
    from melafast.inference.predictor import RunPredictor, load_predictor

    predictor = load_predictor(run)
    assert isinstance(predictor, RunPredictor) and len(predictor.predictors) == 2 and predictor.tta == 1  # not 8
    lib = predictor.predict(folder, meta=meta, num_workers=0, progress=False)
    assert np.allclose(lib, preds["pred"], atol=1e-6)
    paths = sorted(folder.iterdir())[:3]
    assert np.allclose(predictor.predict(paths, meta=meta, num_workers=0, progress=False), lib[:3], atol=1e-6)


def test_predict_without_metadata_uses_the_missing_value_path(run, new_images, tmp_path):
    folder, meta = new_images
    res = invoke("predict", "--run", run, "--images", folder, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output
    plain = pd.read_csv(tmp_path / "p.csv")
    assert len(plain) == 16 and plain["pred"].between(0, 1).all()
    from melafast.inference.predictor import load_predictor

    predictor = load_predictor(run)
    with pytest.warns(UserWarning, match="16 of 16 images have no metadata"):
        assert np.allclose(predictor.predict(folder, num_workers=0, progress=False), plain["pred"], atol=1e-6)
    with_meta = predictor.predict(folder, meta=meta, num_workers=0, progress=False)
    assert not np.allclose(with_meta, plain["pred"], atol=1e-4)  # the metadata matters to this model
    # half the metadata: those rows match the full-metadata prediction, the others the no-metadata one
    pd.read_csv(meta).iloc[:8].to_csv(tmp_path / "half.csv", index=False)
    with pytest.warns(UserWarning, match="8 of 16 images have no metadata"):
        half = predictor.predict(folder, meta=tmp_path / "half.csv", num_workers=0, progress=False)
    names = sorted(p.stem for p in folder.iterdir())
    known = np.isin(names, pd.read_csv(meta)["image_name"].iloc[:8])
    assert np.allclose(half[known], with_meta[known], atol=1e-6)
    assert np.allclose(half[~known], plain["pred"].to_numpy()[~known], atol=1e-6)


def test_test_only_dataset_predicts_submits_and_pseudo_labels(run, sample_dir, tmp_path):
    data = tmp_path / "testonly"
    shutil.copytree(sample_dir / "jpeg" / "test", data / "jpeg" / "test")
    for csv in ("test.csv", "sample_submission.csv"):
        shutil.copy(sample_dir / csv, data / csv)
    res = invoke("predict", "--run", run, "--data", data, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 16
    res = invoke("submit", "--run", run, "--data", data, "--out", tmp_path / "s.csv", "--workers", 0)
    assert res.exit_code == 0, res.output
    res = invoke("pseudo", "--run", run, "--data", data, "--low", 0.5, "--high", 0.5, "--out", tmp_path / "ps.csv",
                 "--workers", 0)
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "ps.csv")) == 16
    res = invoke("predict", "--run", run, "--data", data, "--meta", tmp_path / "p.csv")
    assert res.exit_code == 1 and "--meta goes with --images" in res.stderr


def test_image_table_errors(tmp_path):
    from melafast.data import image_folder, image_table
    from melafast.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jpg"):
        image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        image_table([tmp_path / "nope.jpg"])
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(DataError, match="two images named a"):
        image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Fast by default on GPUs, reproducible when asked


@pytest.fixture
def restore_backend_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


@pytest.mark.parametrize("deterministic", [False, True])
def test_train_leaves_fast_or_deterministic_flags(sample_dir, tmp_path, restore_backend_flags, deterministic):
    from melafast.config import TrainConfig
    from melafast.train.run import train_run

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = deterministic, not deterministic
    cfg = TrainConfig(data=str(sample_dir), arch=TINY_ARCH, size=32, bs=16, epochs=1, freeze_epochs=0, lr=1e-2,
                      folds=2, fold=0, pretrained=False, tta=1, workers=0, deterministic=deterministic,
                      out=str(tmp_path / "run"))
    logs = []
    train_run(cfg, log=logs.append)
    assert torch.backends.cudnn.benchmark is (not deterministic)  # autotuned convolutions unless asked otherwise
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    if deterministic:  # what it could not make deterministic, said: nothing, on the CPU
        assert results["nondeterministic_ops"] == [] and any("every operation ran a deterministic kernel" in m
                                                               for m in logs)
    else:
        assert "nondeterministic_ops" not in results
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.are_deterministic_algorithms_enabled() is deterministic


def test_inference_model_is_channels_last_where_training_is(tiny_dls):
    from melafast.inference.settings import inference_settings
    from melafast.train.learner import melanoma_learner
    from melafast.inference.loop import predict_probs

    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    model = learn.model
    plain = predict_probs(model, tiny_dls.valid, n=2, progress=False)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert inference_settings(model, "cpu") is None  # the CPU: fp32, contiguous, as training there
    assert not model.channels_last and all(w.is_contiguous() for w in convs)
    inference_settings(model, "cpu", channels_last=True)  # what a GPU gets by default
    assert model.channels_last and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not model.training
    assert torch.allclose(predict_probs(model, tiny_dls.valid, n=2, progress=False), plain, atol=1e-5)


def test_predictor_runs_with_the_training_speed_settings(run, new_images, monkeypatch):
    "predict_many sets every model up for the device it predicts on, with the settings it was validated with."
    from melafast.inference import load_predictor, loop

    seen = []
    real = loop.prepare_model
    monkeypatch.setattr(loop, "prepare_model", lambda m, s: seen.append((str(s.device), s.precision)) or real(m, s))
    load_predictor(run).predict(new_images[0], meta=new_images[1], num_workers=0, progress=False)
    assert seen == [("cpu", "fp32"), ("cpu", "fp32")]


def test_each_fold_records_the_precision_and_layout_it_was_validated_with(run):
    for k in (0, 1):
        cfg = json.loads((run / f"fold{k}" / "config.json").read_text())
        assert cfg["precision"] == "fp32" and cfg["channels_last"] is False  # what training resolved to on the CPU


def _spec(**recorded):
    "The ModelSpec of a fold model whose config records `recorded` (precision, channels_last) and nothing else."
    from melafast.record import ModelSpec

    return ModelSpec.from_config(dict(arch="x", size=32, meta=False, n_out=2, vocab=[0, 1], pos=1, model={},
                                      **recorded))


def test_prediction_precision_is_the_validated_one_not_the_devices_best(monkeypatch):
    "A run validated in fp32 (or fp16) is not predicted in bf16 just because the GPU has it."
    from melafast.errors import MelafastError
    from melafast.inference import resolve_settings

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a bf16 GPU, seen from the CPU
    for validated in ("fp32", "fp16", "bf16"):
        s = resolve_settings(_spec(precision=validated, channels_last=True), "cuda")
        assert (s.precision, s.channels_last, s.note) == (validated, True, "")
    assert resolve_settings(_spec(precision="fp32", channels_last=False), "cuda").channels_last is False
    old = resolve_settings(_spec(), "cuda")  # saved before the precision was recorded: the rule of that time, said
    assert old.precision == "bf16" and "does not record" in old.note
    asked = resolve_settings(_spec(precision="fp32"), "cuda", precision="bf16")
    assert asked.precision == "bf16" and "as asked" in asked.note
    cpu = resolve_settings(_spec(precision="bf16", channels_last=True), "cpu")
    assert cpu.precision == "fp32" and "validated in bf16" in cpu.note
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_settings(_spec(precision="bf16"), "cuda").precision == "fp32"
    with pytest.raises(MelafastError, match="no bf16"):
        resolve_settings(_spec(precision="fp32"), "cuda", precision="bf16")


def test_a_run_validated_in_bf16_says_so_where_it_cannot_run_it(run, new_images, tmp_path):
    folder, _ = new_images
    fp32 = pd.read_csv(predict_rows(run, folder, tmp_path / "a.csv").out)["pred"]
    for k in (0, 1):  # as a GPU run would have written them
        cfg_file = run / f"fold{k}" / "config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "precision": "bf16"}))
    res = predict_rows(run, folder, tmp_path / "b.csv")
    assert "validated in bf16, which this cpu cannot run: predicting in fp32" in res.output
    assert np.allclose(pd.read_csv(tmp_path / "b.csv")["pred"], fp32)
    res = predict_rows(run, folder, tmp_path / "c.csv", "--precision", "fp32")
    assert res.exit_code == 0 and "cannot run" not in res.output
    res = predict_rows(run, folder, tmp_path / "d.csv", "--precision", "bf16")
    assert res.exit_code == 1 and "needs a CUDA GPU" in res.stderr and res.stderr.count("\n") == 1


def predict_rows(run, folder, out, *args):
    res = invoke("predict", "--run", run, "--images", folder, "--out", out, "--workers", 0, *args)
    res.out = out
    return res


def test_predict_can_be_deterministic_and_says_what_it_could_not_make_so(run, new_images, tmp_path,
                                                                       restore_backend_flags):
    import warnings

    from melafast.inference import record_nondeterminism

    res = invoke("predict", "--run", run, "--images", new_images[0], "--out", tmp_path / "p.csv", "--workers", 0,
                 "--deterministic")
    assert res.exit_code == 0, res.output
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    with warnings.catch_warnings(record=True) as other, record_nondeterminism() as ops:
        warnings.simplefilter("always")
        for op in ("adaptive_avg_pool2d_backward_cuda", "adaptive_avg_pool2d_backward_cuda", "index_add_cuda_"):
            warnings.warn(f"{op} does not have a deterministic implementation, but you set "
                          "'torch.use_deterministic_algorithms(True, warn_only=True)'. You can file an issue ...")
        warnings.warn("something else")
    assert ops == ["adaptive_avg_pool2d_backward_cuda", "index_add_cuda_"]
    assert [str(w.message) for w in other] == ["something else"]  # other warnings pass through


# --------------------------------------------------------------------------------------------------
# Logs a person can read


def test_piped_train_writes_a_line_per_epoch(sample_dir, tmp_path):
    cmd = [sys.executable, "-m", "melafast", "train", "--data", str(sample_dir), "--arch", TINY_ARCH, "--size", "32",
           "--bs", "8", "--epochs", "2", "--folds", "2", "--no-pretrained", "--lr", "1e-2", "--workers", "0",
           "--tta", "2", "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert "\r" not in res.stdout and "█" not in res.stdout + res.stderr  # no bar redraws
    epochs = [line for line in lines if " · epoch " in line]
    assert len(epochs) == 2 * 3  # 2 folds x (1 frozen + 2) epochs, 4 batches of 8 each: one line per epoch
    assert all("melanoma_auc" in line and "img/s" in line and "ETA" in line for line in epochs)
    # each says which fold of how many, and the time left in the whole run
    assert [line.split(" · ")[0] for line in epochs] == ["fold 0 (1/2)"] * 3 + ["fold 1 (2/2)"] * 3
    assert all(" · run ETA " in line for line in epochs)
    assert "fold 1: " in res.stdout and "(2 of the run's 2 folds; run ETA " in res.stdout
    assert sum(line.startswith("TTA x2: ") for line in lines) == 2
    assert len(lines) <= 21, res.stdout  # the epochs, the TTA and fold lines, the settings, near-duplicates, the CV table


def test_lr_find_is_never_silent_in_a_log(tiny_dls, capsys, monkeypatch):
    from melafast import melanoma_learner
    from melafast.progress import LineProgress

    monkeypatch.setattr(LineProgress, "every", 0.0)  # a line at every batch instead of every 30 s
    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    assert isinstance(learn.progress, LineProgress)  # pytest's stdout is not a terminal: a log
    learn.lr_find(num_it=6, show_plot=False)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lr_find: ")]
    assert said[0].startswith("lr_find: up to ") and said[-1].startswith("lr_find: ")
    assert len(said) >= 4 and any("iterations in" in line for line in said[1:-1])


# --------------------------------------------------------------------------------------------------
# The hub's own offline logic

HUB_PROBE = textwrap.dedent("""
    import socket, sys, time
    from melafast.errors import WeightsError
    from melafast.model import create_backbone
    if sys.argv[1] == "no-sockets":
        def refuse(*a, **k):
            raise AssertionError("a socket was opened")
        socket.socket.connect = refuse
    t0 = time.time()
    try:
        net = create_backbone("mobilenetv3_small_050", pretrained=True)
        print("LOADED", float(net.conv_stem.weight.flatten()[0]))
    except WeightsError as e:
        print("ERROR", e)
    print("SECONDS", time.time() - t0)
""")


def _hub_probe(tmp_path, mode, **env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HOME": str(tmp_path / "hf"), **env}
    res = subprocess.run([sys.executable, "-c", HUB_PROBE, mode], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    return out, float(out["SECONDS"])


def test_hub_offline_mode_is_respected_without_touching_the_network(tmp_path):
    out, seconds = _hub_probe(tmp_path, "no-sockets", HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE is set" in out["ERROR"] and "--weights FILE" in out["ERROR"] and "--no-pretrained" in out["ERROR"]
    assert seconds < 30


def test_hub_endpoint_setting_is_respected(tmp_path):
    out, seconds = _hub_probe(tmp_path, "network", HF_ENDPOINT="http://127.0.0.1:9")  # a mirror that is down
    assert "http://127.0.0.1:9 does not answer" in out["ERROR"] and "--weights FILE" in out["ERROR"]
    assert seconds < 60  # one request, not the hub client's retry schedule


def test_hub_cache_serves_offline(tmp_path):
    "Weights an earlier online run left in the hub cache are used offline, through huggingface_hub's cache lookup."
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("mobilenetv3_small_050", pretrained=False)
    repo = timm.models.get_pretrained_cfg("mobilenetv3_small_050").hf_hub_id
    snap = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snap / "model.safetensors"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    out, _ = _hub_probe(tmp_path, "no-sockets", HF_HUB_OFFLINE="1")
    assert "ERROR" not in out
    assert float(out["LOADED"]) == pytest.approx(net.conv_stem.weight.flatten()[0].item())


def test_pickled_weights_are_refused(tmp_path):
    from melafast.errors import WeightsError
    from melafast.model import create_backbone

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"conv_stem.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        create_backbone(TINY_ARCH, weights=tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------------------------
# prepare reruns


def _shorter_sides(folder):
    sides = set()
    for p in folder.iterdir():
        with Image.open(p) as im:
            sides.add(min(im.size))
    return sides


def test_prepare_redoes_copies_of_another_size_or_an_older_source(sample_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    out = tmp_path / "prepared"
    res = invoke("prepare", "--src", src, "--out", out, "--size", 48, "--workers", 1)
    assert res.exit_code == 0 and "80 images resized" in res.output
    assert json.loads((out / "prepare.json").read_text())["size"] == 48 and _shorter_sides(out / "test") == {48}
    res = invoke("prepare", "--src", src, "--out", out, "--size", 32, "--workers", 1)  # another size: all redone
    assert "redoing every image at 32 px" in res.output and "80 images resized" in res.output
    assert _shorter_sides(out / "train") == _shorter_sides(out / "test") == {32}
    res = invoke("prepare", "--src", src, "--out", out, "--size", 32, "--workers", 1)  # same settings: nothing
    assert "0 images resized" in res.output and "80 already done" in res.output
    changed = next((src / "jpeg" / "test").iterdir())
    with Image.open(changed) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)  # the source changed after its copy was made
    res = invoke("prepare", "--src", src, "--out", out, "--size", 32, "--workers", 1)
    assert "1 images resized" in res.output
    # a folder prepared before sizes were recorded: each copy's own size tells
    (out / "prepare.json").unlink()
    victim = next((out / "train").iterdir())
    with Image.open(victim) as im:
        im.resize((40, 40)).save(victim)
    res = invoke("prepare", "--src", src, "--out", out, "--size", 32, "--workers", 1)
    assert "1 images resized" in res.output and _shorter_sides(out / "train") == {32}
