"""Shared fixtures: a small synthetic dataset, runs trained once per session and shared, and the optional real data
in ../shared.

`make_run(**settings)` trains each distinct set of settings once per test session, whichever xdist worker asks
first (the others wait for it, through a file lock), and hands every test the same finished run folder; a test that
writes into a run takes `copy_run(...)` of it. Everything shared lives under one folder per session.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from filelock import FileLock

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
# image signatures (perceptual hashes, skin tone) are cached here, not in the user's ~/.cache
os.environ.setdefault("MELAFAST_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "melafast-test-cache"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker: tiny models gain nothing from sharing two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # this worker, and the processes it starts (notebooks, torchrun)
    import torch

    torch.set_num_threads(1)

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

# the tiny run every shared run starts from: 64 sample images, 32 px, 1 frozen + 1 epoch, 2 folds, TTA x1
TINY = dict(arch=TINY_ARCH, size=32, bs=16, epochs=1, folds=2, lr="1e-2", pretrained=False, workers=0, tta=1)

# the slowest tests start first, so that the workers finish together rather than one waiting on a long tail
FIRST = ("test_quality_small", "test_notebook_runs", "test_the_main_job", "test_two_processes", "test_saved_fold_model",
         "test_prediction_memory", "test_the_audit_flags", "test_real_images", "test_throughput", "test_piped_train")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        hits = [i for i, name in enumerate(FIRST) if item.name.startswith(name)]
        return hits[0] if hits else len(FIRST)

    items.sort(key=rank)  # stable: the others keep their order


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    "One folder per test session that every xdist worker sees (each worker's own temp folder sits inside it)."
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def _once(root: Path, name: str, make):
    "`make(path)` once per session for `root/name`, whichever worker comes first; the path when it is done."
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def sample_dir(shared_root):
    from melafast.data import make_sample

    return _once(shared_root, "sample", lambda p: make_sample(p, n_train=64, n_test=16, seed=1, px=64))


@pytest.fixture(scope="session")
def sample_df(sample_dir):
    from melafast.data import load_competition, make_folds

    train, _ = load_competition(sample_dir)
    return make_folds(train, n_folds=2, seed=0)


@pytest.fixture
def tiny_dls(sample_df):
    from melafast.data import melanoma_dls

    return melanoma_dls(sample_df, fold=0, size=32, bs=16, num_workers=0)


def _cli_args(settings: dict) -> list:
    "`melafast train` arguments for `settings` (True/False switches as --x/--no-x)."
    args = ["train"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="session")
def make_run(shared_root, sample_dir):
    """make_run(**settings) -> the folder of a finished `melafast train` run: the tiny run (`TINY`) on the sample,
    with `settings` on top; trained once per session for each distinct set of settings. Its printed output is in
    `run_output(path)`. Do not write into it: take `copy_run(path, tmp_path)`."""
    from typer.testing import CliRunner

    from melafast.cli import app

    def make(**settings):
        settings = {"data": sample_dir, **TINY, **settings}
        key = json.dumps({k: str(v) for k, v in sorted(settings.items())})
        name = "run-" + hashlib.sha1(key.encode()).hexdigest()[:12]

        def train(path):
            res = CliRunner().invoke(app, _cli_args({**settings, "out": path}), catch_exceptions=False)
            assert res.exit_code == 0, res.output
            path.with_suffix(".log").write_text(res.output)

        return _once(shared_root, name, train)

    return make


def run_output(run: Path) -> str:
    "What `melafast train` printed while it made the shared run `run`."
    return run.with_suffix(".log").read_text()


def copy_run(run: Path, dest: Path) -> Path:
    "A private copy of a shared run that a test may write into."
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_run(make_run):
    """A finished 2-fold run on the sample (32 px, 1 epoch after the frozen one, TTA x1): a run folder to read."""
    return make_run()


@pytest.fixture(scope="session")
def sample_diagnosis(shared_root, sample_dir):
    "The sample with a diagnosis column (melanoma for every melanoma, nevus or seborrheic keratosis for the others)."
    import numpy as np
    import pandas as pd

    def make(path):
        shutil.copytree(sample_dir, path)
        train = pd.read_csv(path / "train.csv")
        other = np.random.default_rng(0).choice(["nevus", "seborrheic keratosis"], len(train))
        train["diagnosis"] = np.where(train["target"] == 1, "melanoma", other)
        train.to_csv(path / "train.csv", index=False)

    return _once(shared_root, "sample-diagnosis", make)


def invoke(*args):
    "`melafast ARGS` in this process, with what it printed."
    from typer.testing import CliRunner

    from melafast.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def sample_2024(shared_root):
    "The synthetic ISIC 2024 sample: metadata CSVs keyed by isic_id, HDF5 image stores."
    def make(path):
        res = invoke("sample", "--format", "isic2024", "--out", path, "--n-train", 300, "--n-test", 30)
        assert res.exit_code == 0, res.output

    return _once(shared_root, "sample-2024", make)


COLUMNS_2024 = ["--cat", "sex", "--cat", "anatom_site_general", "--cont", "age_approx", "--cont", "clin_size_long_diam_mm",
                "--cont", "tbp_lv_norm_border", "--cont", "tbp_lv_dnn_lesion_confidence"]
TINY_2024 = ["--arch", TINY_ARCH, "--size", 32, "--bs", 32, "--epochs", 1, "--folds", 2, "--lr", "1e-2",
             "--no-pretrained", "--workers", 0, "--tta", 1]


def _run_2024(shared_root, sample_2024, name, *args):
    def make(path):
        res = invoke("train", "--data", sample_2024, *TINY_2024, "--out", path / "run", *args)
        assert res.exit_code == 0, res.output
        (path / "train.log").write_text(res.output)

    path = _once(shared_root, name, make)
    return path / "run", (path / "train.log").read_text()


@pytest.fixture(scope="session")
def run_2024(sample_2024, shared_root):
    "A tiny run on the 2024 sample with its columns declared, trained once per session; the lines it printed."
    return _run_2024(shared_root, sample_2024, "run-2024", *COLUMNS_2024)


@pytest.fixture(scope="session")
def run_2024_patient(sample_2024, shared_root):
    "A tiny 2024 run with --patient-features on lesion size, and sex: trained once per session; its output."
    return _run_2024(shared_root, sample_2024, "run-2024-patient", "--cont", "clin_size_long_diam_mm", "--cat", "sex",
                     "--patient-features")


@pytest.fixture(scope="session")
def main_job(shared_root):
    """README command 1 (the main job: 3 folds, 64 px, 8 epochs, TTA x8) on its default sample, trained once per
    session: (its run folder, its dataset folder)."""
    from melafast.data import make_sample

    def make(path):
        data = make_sample(path / "sample")
        res = invoke("train", "--data", data, "--arch", TINY_ARCH, "--size", 64, "--bs", 16, "--epochs", 8, "--lr",
                     "1e-2", "--folds", 3, "--no-pretrained", "--workers", 0, "--out", path / "run")
        assert res.exit_code == 0, res.output

    path = _once(shared_root, "main-job", make)
    return path / "run", path / "sample"


@pytest.fixture(scope="session")
def constancy_run(make_run):
    """The tiny run with Shades of Gray colour constancy (p = 6) and folds grouped by sex (a stand-in for an
    institution column: each patient has one)."""
    return make_run(color_constancy=6, group_by="sex")


@pytest.fixture(scope="session")
def ham_evaluation(shared_root, tiny_run):
    """`melafast evaluate` of the tiny run on 60 HAM10000 images of the Queensland practice (a clinic and images it
    never saw; with their institution and label source from sources.csv), once per session: (its folder, the table)."""
    import pandas as pd

    if not (HAM / "sources.csv").is_file():
        pytest.skip("../shared/data/ham10000/sources.csv not present")

    def make(path):
        table = pd.read_csv(HAM / "train.csv").merge(pd.read_csv(HAM / "sources.csv"), on="image_name")
        site = table[table["attribution"] == "rosendahl"]
        chosen = pd.concat([site[site["target"] == 1].sample(15, random_state=0),
                            site[site["target"] == 0].sample(45, random_state=0)])
        data = path / "data"
        data.mkdir(parents=True)
        chosen.to_csv(data / "train.csv", index=False)
        res = invoke("evaluate", "--run", tiny_run, "--data", data, "--images", HAM / "images", "--name", "queensland",
                     "--group-by", "dx_type", "--out", path / "evaluation", "--bootstrap", 100, "--errors", 3, "--workers", 0)
        assert res.exit_code == 0, res.output

    path = _once(shared_root, "ham-evaluation", make)
    return path / "evaluation", pd.read_csv(path / "data" / "train.csv")


def without_lookalikes(table, images, sample_dir):
    """The rows of `table` (image_name; images in the folder `images`) whose picture is not a near-duplicate, to the
    perceptual hash, of a training image of the sample: drawn lesions resemble each other far more than photographs."""
    import pandas as pd

    from melafast.config import DUP_DISTANCE
    from melafast.data.signatures import cross_duplicates, signatures

    train = pd.read_csv(sample_dir / "train.csv")
    ours = table.assign(phash=signatures([images / f"{n}.jpg" for n in table["image_name"]], progress=False)["phash"])
    theirs = train.assign(phash=signatures([sample_dir / "jpeg" / "train" / f"{n}.jpg" for n in train["image_name"]],
                                           progress=False)["phash"])
    alike = cross_duplicates(ours, theirs, DUP_DISTANCE)["image_name"]
    return table[~table["image_name"].isin(alike)].reset_index(drop=True)


@pytest.fixture(scope="session")
def external_dir(shared_root, sample_dir):
    """External data for `train --external`: labelled drawn lesions of other patients (names EXT_*), none of them a
    look-alike of a sample image to the perceptual hash (train would drop those, and say so): (folder, images)."""
    import pandas as pd

    from melafast.data import make_sample

    def make(path):
        src = make_sample(path.parent / "external-src", n_train=80, n_test=1, seed=3, px=64)
        table = pd.read_csv(src / "train.csv")
        table = without_lookalikes(table, src / "jpeg" / "train", sample_dir).head(48)
        (path / "jpeg" / "train").mkdir(parents=True)
        for name in table["image_name"]:
            shutil.copy(src / "jpeg" / "train" / f"{name}.jpg", path / "jpeg" / "train" / f"EXT_{name}.jpg")
        table.assign(image_name="EXT_" + table["image_name"], patient_id="EXT_" + table["patient_id"]).to_csv(
            path / "train.csv", index=False)

    path = _once(shared_root, "external", make)
    return path, len(pd.read_csv(path / "train.csv"))
