"""The `melafast` command line: thin Typer commands over the library (torch and fastai load inside commands)."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .errors import MelafastError

_state = {"debug": False}  # set by the top-level callback on every invocation


def _choices(name: str, values: tuple) -> type:
    "A str Enum whose members are `values`: Typer shows them as the option's choices."
    return Enum(name, {v: v for v in values}, type=str)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="melafast: melanoma detection from dermoscopic images + metadata (fastai + timm).")


Precision = _choices("Precision", ("auto", "bf16", "fp16", "fp32"))


Split = _choices("Split", ("test", "train"))


Blend = _choices("Blend", ("mean", "rank"))


Keep = _choices("Keep", ("last", "best"))


LrFindOn = _choices("LrFindOn", ("frozen", "unfrozen"))
LrFindOnOpt = Annotated[LrFindOn, typer.Option("--lr-find-on", help="Model lr_find runs on: frozen (head only, what "
                                               "the first epochs train) or unfrozen (the whole network).")]


def _friendly(fn):
    "Turn a MelafastError into one line on stderr and exit code 1; --debug shows the traceback instead."

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MelafastError as e:
            if _state["debug"]:
                raise
            msg = str(e)
            if "Original Traceback" in msg:  # raised in a DataLoader worker: torch wraps it in the worker's traceback
                msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False):
    """melafast: train fold ensembles, predict and submit for the SIIM-ISIC melanoma task."""
    _state["debug"] = debug


# Options shared by several commands
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset folder with train.csv (default data/; the "
                                                 "synthetic sample is written to data/sample when data/ is empty).")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder, if detection does not find it.")]
ArchOpt = Annotated[str, typer.Option("--arch", help="timm architecture name.")]
SizeOpt = Annotated[int, typer.Option("--size", help="Square image size in pixels.")]
BsOpt = Annotated[int, typer.Option("--bs", help="Batch size.")]
FoldsOpt = Annotated[int, typer.Option("--folds", help="Number of patient-grouped folds.")]
MetaOpt = Annotated[bool, typer.Option("--meta/--no-meta", help="Fuse patient metadata with the image.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto: bf16 on new GPUs, fp16 on old, fp32 on CPU.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local timm backbone checkpoint (.safetensors/.pth).")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for folds, initialisation and shuffling.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader processes (default: one per core, max 8).")]
TtaOpt = Annotated[int, typer.Option("--tta", help="Dihedral TTA views: 1, 2, 4 or 8.")]
RunTtaOpt = Annotated[Optional[int], typer.Option("--tta", help="Dihedral TTA views: 1, 2, 4 or 8 (default: the "
                                                  "run's, as it scored its out-of-fold predictions).")]
RunDataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the run's).")]


Target = _choices("Target", ("melanoma", "diagnosis"))


Aug = _choices("Aug", ("light", "medium", "heavy"))


BadImage = _choices("BadImage", ("error", "skip"))


BadImageOpt = Annotated[BadImage, typer.Option("--on-bad-image", help="Unreadable, empty or truncated images: "
                                               "error (stop, listing them) or skip (leave out / median prediction).")]


def _parse_fold(fold: str) -> Optional[int]:
    if fold == "all":
        return None
    try:
        return int(fold)
    except ValueError:
        raise MelafastError(f"--fold must be 'all' or a fold number, got {fold!r}") from None


def _parse_lr(lr: str) -> Optional[float]:
    if lr == "auto":
        return None
    try:
        return float(lr)
    except ValueError:
        raise MelafastError(f"--lr must be a number or 'auto', got {lr!r}") from None


def _str(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)


@app.command()
@_friendly
def train(
    data: DataOpt = None,
    images: ImagesOpt = None,
    arch: ArchOpt = "efficientnet_b3",
    size: SizeOpt = 384,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs with the whole network training.")] = 10,
    bs: BsOpt = 64,
    lr: Annotated[str, typer.Option("--lr", help="Base learning rate, or 'auto' for lr_find's valley per fold.")] = "auto",
    freeze_epochs: Annotated[int, typer.Option("--freeze-epochs", help="Epochs first with the backbone frozen.")] = 1,
    lr_find_on: LrFindOnOpt = LrFindOn.frozen,
    lr_mult: Annotated[float, typer.Option("--lr-mult", help="Head learning rate / backbone learning rate once "
                                           "unfrozen (fastai's fine_tune uses 100).")] = 1.0,
    keep: Annotated[Keep, typer.Option("--keep", help="Epoch each fold keeps: last (the CV is honest) or best "
                                       "(chosen on the validation rows: the CV it reports is optimistic; the honest "
                                       "last-epoch CV is reported too).")] = Keep.last,
    frozen_bn: Annotated[bool, typer.Option("--frozen-bn/--adapt-bn", help="During frozen epochs keep the backbone's "
                                            "batch-norm statistics fixed, or let them adapt to the data.")] = True,
    folds: FoldsOpt = 5,
    fold: Annotated[str, typer.Option("--fold", help="'all', or one fold number to train only that fold.")] = "all",
    meta: MetaOpt = True,
    precision: PrecisionOpt = Precision.auto,
    tta: TtaOpt = 8,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    seed: SeedOpt = 42,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic GPU algorithms and no cuDNN "
                                                "autotuning: bit-for-bit repeatable on a GPU, slower. (The CPU "
                                                "repeats anyway.)")] = False,
    workers: WorkersOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<arch>-<size>-<time>).")] = None,
    on_bad_image: BadImageOpt = BadImage.error,
    external: Annotated[Optional[List[Path]], typer.Option("--external", help="Extra dataset in the same CSV format "
                                                           "(repeatable): training rows only, never scored.")] = None,
    upsample: Annotated[int, typer.Option("--upsample", help="Show each training melanoma K times per epoch.")] = 1,
    target: Annotated[Target, typer.Option("--target", help="melanoma (2 classes) or diagnosis (one class per "
                                           "diagnosis; the melanoma probability is scored).")] = Target.melanoma,
    extra_meta: Annotated[bool, typer.Option("--extra-meta/--no-extra-meta", help="Add images per patient and log "
                                             "file size to the metadata.")] = False,
    aug: Annotated[Aug, typer.Option("--aug", help="Augmentation preset (all presets flip and turn).")] = Aug.medium,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Validate and keep an exponential moving average of "
                                                 "the weights with this decay (e.g. 0.999).")] = None,
    swa: Annotated[int, typer.Option("--swa", help="Average the weights of the last N epochs (SWA; batch norm "
                                     "statistics recomputed), validate and keep that average. 0 = off.")] = 0,
    pseudo: Annotated[Optional[Path], typer.Option("--pseudo", help="Pseudo-label CSV from `melafast pseudo`: its "
                                                   "soft-labelled test images join the training folds.")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the backbone (GPU; the first "
                                          "epoch pays minutes of compilation).")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this interrupted run folder with its own "
                                                   "settings (other options but --workers are ignored).")] = None,
):
    """Train a cross-validated fold ensemble; write a run folder with models, metrics, OOF predictions and plots."""
    from .run import TrainConfig, resume_run, train_run

    if resume is not None:
        result = resume_run(resume, workers=workers, log=typer.echo)
    else:
        cfg = TrainConfig(data=_str(data), images=_str(images), arch=arch, size=size, epochs=epochs,
                          freeze_epochs=freeze_epochs, bs=bs, lr=_parse_lr(lr), lr_find_on=lr_find_on.value,
                          lr_mult=lr_mult, keep=keep.value, frozen_bn=frozen_bn, folds=folds,
                          fold=_parse_fold(fold), meta=meta, precision=precision.value, tta=tta, weights=_str(weights),
                          pretrained=pretrained, seed=seed, deterministic=deterministic, workers=workers, out=_str(out),
                          on_bad_image=on_bad_image.value, compile=compile,
                          external=[str(p) for p in external or []], upsample=upsample, target=target.value,
                          extra_meta=extra_meta, aug=aug.value, ema=ema, swa=swa, pseudo=_str(pseudo))
        result = train_run(cfg, log=typer.echo)
    from .distributed import is_main

    if is_main():
        typer.echo(f"run folder: {result.path}")


@app.command("lr-find")
@_friendly
def lr_find(
    data: DataOpt = None,
    images: ImagesOpt = None,
    arch: ArchOpt = "efficientnet_b3",
    size: SizeOpt = 384,
    bs: BsOpt = 64,
    folds: FoldsOpt = 5,
    fold: Annotated[int, typer.Option("--fold", help="Fold whose training split is used.")] = 0,
    lr_find_on: LrFindOnOpt = LrFindOn.frozen,
    meta: MetaOpt = True,
    precision: PrecisionOpt = Precision.auto,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    seed: SeedOpt = 42,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to save the plot.")] = Path("lr_find.png"),
):
    """Run fastai's learning-rate finder on one fold; save the plot and print the suggestions."""
    from .run import TrainConfig, lr_find_run

    cfg = TrainConfig(data=_str(data), images=_str(images), arch=arch, size=size, bs=bs, folds=folds, fold=fold,
                      lr_find_on=lr_find_on.value, meta=meta,
                      precision=precision.value, weights=_str(weights), pretrained=pretrained, seed=seed, workers=workers)
    lr_find_run(cfg, out=out, log=typer.echo)


@app.command()
@_friendly
def predict(
    run: Annotated[Path, typer.Option("--run", help="Run folder from `melafast train` (or one fold folder).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder whose --split to predict (default: "
                                                 "the run's; only that split's CSV and images are needed).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Without --data: predict every image in this "
                                                   "folder. With --data: where that dataset's images are.")] = None,
    meta: Annotated[Optional[Path], typer.Option("--meta", help="With --images FOLDER: a CSV of image_name, sex, "
                                                 "age_approx, anatom_site_general_challenge (images it lacks, or all "
                                                 "without it, count as unknown).")] = None,
    split: Annotated[Split, typer.Option("--split", help="Which CSV of --data to predict.")] = Split.test,
    tta: RunTtaOpt = None,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="CSV to write: image_name, pred (the melanoma probability), run "
                                      "(and target for train).")] = Path("preds.csv"),
    on_bad_image: BadImageOpt = BadImage.error,
):
    """Predict melanoma probabilities with every fold model of a run (their mean): a folder of new images, or a
    dataset split."""
    from .submit import predict_images, predict_split

    if data is None and images is not None:
        predict_images(run, images, meta=meta, tta=tta, out=out, bs=bs, num_workers=workers,
                       on_bad_image=on_bad_image.value, log=typer.echo)
        return
    if meta is not None:
        raise MelafastError("--meta goes with --images FOLDER (and no --data): a dataset's metadata is in its CSV")
    predict_split(run, data=data, split=split.value, tta=tta, out=out, bs=bs, num_workers=workers, images=images,
                  on_bad_image=on_bad_image.value, log=typer.echo)


@app.command()
@_friendly
def submit(
    run: Annotated[Optional[List[Path]], typer.Option("--run", help="Run folder; repeat to ensemble several runs.")] = None,
    ensemble: Annotated[Optional[Path], typer.Option("--ensemble", help="Ensemble file from `melafast ensemble` "
                                                     "(its runs, blend and weights) instead of --run.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the first run's).")] = None,
    images: ImagesOpt = None,
    tta: RunTtaOpt = None,
    blend: Annotated[Blend, typer.Option("--blend", help="How runs are combined: mean probability or mean rank.")] = Blend.mean,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Submission file to write.")] = Path("submission.csv"),
    upload: Annotated[bool, typer.Option("--upload", help="Submit to Kaggle (needs melafast[kaggle] and credentials).")] = False,
    message: Annotated[str, typer.Option("--message", help="Kaggle submission message.")] = "melafast submission",
    on_bad_image: BadImageOpt = BadImage.error,
):
    """Predict the test set with every fold of every run, blend, write and validate submission.csv."""
    from .submit import make_submission, read_ensemble

    if bool(run) == bool(ensemble):
        raise MelafastError("pass either --run DIR (repeatable) or --ensemble FILE")
    runs, method, weights = [str(r) for r in run or []], blend.value, None
    if ensemble is not None:
        ens = read_ensemble(ensemble)
        runs, method, weights = ens["runs"], ens["blend"], ens["weights"]
    path = make_submission(runs, data=data, tta=tta, blend_method=method, out=out, bs=bs, num_workers=workers,
                           images=images, on_bad_image=on_bad_image.value, weights=weights, log=typer.echo)
    if upload:
        from .kaggle import upload_submission

        upload_submission(path, message)
        typer.echo(f"uploaded {path} to Kaggle")


@app.command()
@_friendly
def pseudo(
    run: Annotated[Path, typer.Option("--run", help="Trained run folder whose fold ensemble labels the test set.")],
    data: RunDataOpt = None,
    images: ImagesOpt = None,
    low: Annotated[float, typer.Option("--low", help="Keep test images predicted at or below this probability.")] = 0.1,
    high: Annotated[float, typer.Option("--high", help="Keep test images predicted at or above this probability.")] = 0.9,
    hard: Annotated[bool, typer.Option("--hard/--soft", help="Round the kept predictions to 0/1 (default: keep the "
                                       "probability as a soft label).")] = False,
    tta: RunTtaOpt = None,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (default <run>/pseudo.csv).")] = None,
):
    """Label the confident test images with a run's predictions, for `melafast train --pseudo`."""
    from .pseudo import pseudo_labels

    pseudo_labels(run, data=data, out=out, low=low, high=high, hard=hard, tta=tta, bs=bs, num_workers=workers,
                  images=images, log=typer.echo)


@app.command("ensemble")
@_friendly
def ensemble_cmd(
    run: Annotated[List[Path], typer.Option("--run", help="Finished run folder; repeat for every run to blend.")],
    out: Annotated[Path, typer.Option("--out", help="Ensemble file to write (for submit --ensemble).")] = Path("ensemble.json"),
):
    """Score equal and weighted blends of several runs on their out-of-fold predictions (weights cross-fitted over
    the folds, so every score is honest); keep the best for `submit --ensemble`."""
    from .submit import ensemble_runs

    ensemble_runs([str(r) for r in run], out=out, log=typer.echo)


@app.command()
@_friendly
def report(
    run: Annotated[Path, typer.Option("--run", help="Finished run folder from `melafast train`.")],
    data: RunDataOpt = None,
    images: ImagesOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default <run>/report.html); "
                                                "its figures go to <out stem>_figures/.")] = None,
    errors: Annotated[int, typer.Option("--errors", help="Images per error grid (missed melanomas, false alarms) "
                                        "with Grad-CAM maps; 0 leaves the grids out.")] = 8,
    importance: Annotated[bool, typer.Option("--importance/--no-importance", help="Permutation importance of the "
                                             "metadata (one pass over the out-of-fold images).")] = True,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the AUC intervals.")] = 1000,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
):
    """Write an HTML report of a run: AUC with its interval, curves and operating points, calibration, subgroups,
    the worst errors with Grad-CAM maps, what the metadata adds, training curves."""
    from .report import run_report

    if errors < 0 or bootstrap < 1:
        raise MelafastError("--errors must be 0 or more and --bootstrap at least 1")
    run_report(run, data=data, out=out, images=images, n_errors=errors, importance=importance, n_boot=bootstrap, bs=bs,
               num_workers=workers, log=typer.echo)


@app.command()
@_friendly
def prepare(
    src: Annotated[Path, typer.Option("--src", help="Dataset folder to copy (train.csv, test.csv, images).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the resized copy.")],
    size: Annotated[int, typer.Option("--size", help="Shorter image side after resizing, in pixels.")] = 384,
    images: ImagesOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes (default: one per core).")] = None,
):
    """Write a resized copy of a dataset (shorter side = --size, aspect kept); already-done images are skipped."""
    from .prepare import prepare_dataset

    prepare_dataset(src, out, size=size, workers=workers, images=images, log=typer.echo)


@app.command()
@_friendly
def download(
    out: Annotated[Path, typer.Option("--out", help="Folder to download into.")] = Path("data"),
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="A Kaggle dataset owner/name instead of the competition.")] = None,
):
    """Download the competition (or a Kaggle dataset, e.g. a resized copy) with the Kaggle API."""
    from .kaggle import download as kaggle_download

    kaggle_download(out, dataset=dataset, log=typer.echo)
    typer.echo(f"done: train with  melafast train --data {out}")


@app.command()
@_friendly
def sample(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the synthetic dataset to.")] = Path("data/sample"),
    n_train: Annotated[int, typer.Option("--n-train", help="Training images.")] = 240,
    n_test: Annotated[int, typer.Option("--n-test", help="Test images.")] = 60,
    seed: SeedOpt = 0,
):
    """Write a small SYNTHETIC dataset (drawn lesions) in the Kaggle layout, to try melafast without downloads."""
    if n_train < 4 or n_test < 1:
        raise MelafastError("--n-train must be at least 4 and --n-test at least 1")
    from .data import make_sample

    path = make_sample(out, n_train=n_train, n_test=n_test, seed=seed)
    typer.echo(f"wrote a SYNTHETIC sample to {path}: {n_train} train + {n_test} test images (not real patients)")


def main():  # pragma: no cover - `python -m melafast`
    app(prog_name="melafast")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
