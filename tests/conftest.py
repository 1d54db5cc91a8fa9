"""Shared fixtures: a small synthetic dataset, and the optional real data in ../shared."""

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MELAFAST_SHARED", REPO.parent / "shared"))
HAM = SHARED / "data" / "ham10000"
ISIC_META = SHARED / "data" / "isic2020_meta" / "train.csv"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"
LITE2 = SHARED / "weights" / "tf_efficientnet_lite2.safetensors"
TINY_ARCH = "mobilenetv3_small_050"  # the smallest fast timm net: tests train it from random init

needs_ham = pytest.mark.skipif(not HAM.is_dir(), reason="../shared/data/ham10000 not present")
needs_isic_meta = pytest.mark.skipif(not ISIC_META.is_file(), reason="../shared/data/isic2020_meta not present")
needs_lite0 = pytest.mark.skipif(not LITE0.is_file(), reason="../shared/weights not present")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    from melafast.data import make_sample

    return make_sample(tmp_path_factory.mktemp("sample"), n_train=64, n_test=16, seed=1, px=64)


@pytest.fixture(scope="session")
def sample_df(sample_dir):
    from melafast.data import load_competition, make_folds

    train, _ = load_competition(sample_dir)
    return make_folds(train, n_folds=2, seed=0)


@pytest.fixture
def tiny_dls(sample_df):
    from melafast.data import melanoma_dls

    return melanoma_dls(sample_df, fold=0, size=32, bs=16, num_workers=0)


@pytest.fixture(scope="session")
def tiny_run(sample_dir, tmp_path_factory):
    """A finished 2-fold run on the sample (32 px, 1 epoch after the frozen one, TTA x1): a run folder to read."""
    from typer.testing import CliRunner

    from melafast.cli import app

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    args = ["train", "--data", sample_dir, "--arch", TINY_ARCH, "--size", 32, "--bs", 16, "--epochs", 1, "--folds", 2,
            "--no-pretrained", "--lr", "1e-2", "--workers", 0, "--tta", 1, "--out", out]
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out
