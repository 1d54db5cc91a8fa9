"""Using a trained run: `predict`, `submit`, `pseudo`, `ensemble`, `report`, `calibrate` and `compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import MelafastError
from .app import app, friendly
from .options import (BadImage, BadImageOpt, Blend, BsOpt, FinishedRunOpt, ImagesOpt, RunDataOpt, RunPrecisionOpt,
                      RunTtaOpt, Split, WorkersOpt)
from .options import check_run
from .options import value as _value


@app.command()
@friendly
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
    out: Annotated[Path, typer.Option("--out", help="CSV to write: image_name; pred (the melanoma probability: the "
                                      "mean of the fold models over the run's TTA views); run; pred_min and pred_max "
                                      "(the fold models' range); pred_calibrated when the run has a recalibration "
                                      "(`melafast recalibrate`); pred_at_prevalence with --prevalence; with an operating "
                                      "point saved in the run, decision (1: melanoma) and, when the fold models' vote "
                                      "decides, votes (the models at or above its threshold); target for --split "
                                      "train; image_ok when --on-bad-image skip skipped any.")] = Path("preds.csv"),
    on_bad_image: BadImageOpt = BadImage.error,
    precision: RunPrecisionOpt = None,
    prevalence: Annotated[Optional[float], typer.Option(
        "--prevalence", help="Also write pred_at_prevalence: the probability where this share of lesions are "
        "melanomas (e.g. 0.02 for a screening clinic), moved from the share the run learnt from (or, with a "
        "recalibration, from the recalibrated probability and the share it was fitted at).")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic GPU kernels, no cuDNN autotuning: "
                                                "the same images give the same bits on this machine and software, "
                                                "slower. (The CPU repeats anyway.)")] = False,
):
    """Predict melanoma probabilities with a run's fold models: a folder of new images, or a dataset split."""
    check_run(run)
    from ..inference import set_determinism
    from ..inference.predict import predict_images, predict_split

    if meta is not None and not (data is None and images is not None):
        raise MelafastError("--meta goes with --images FOLDER (and no --data): a dataset's metadata is in its CSV")
    set_determinism(deterministic)
    if data is None and images is not None:
        predict_images(run, images, meta=meta, tta=tta, out=out, bs=bs, num_workers=workers,
                       on_bad_image=on_bad_image.value, log=typer.echo, precision=_value(precision),
                       prevalence=prevalence)
        return
    predict_split(run, data=data, split=split.value, tta=tta, out=out, bs=bs, num_workers=workers, images=images,
                  on_bad_image=on_bad_image.value, log=typer.echo, precision=_value(precision), prevalence=prevalence)


@app.command()
@friendly
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
    precision: RunPrecisionOpt = None,
    stack: Annotated[bool, typer.Option("--stack", help="Submit the run's stacked trees (`melafast stack`) on the "
                                        "test table and its image scores.")] = False,
):
    """Predict the test set with every fold of every run, blend, write and validate submission.csv."""
    check_run(*(run or []))
    if stack and run:
        from ..runfolder import RunFolder

        RunFolder(run[0]).check_stack(data)  # the stack and its dataset's tables, before torch loads
    from ..inference.blend import read_ensemble
    from ..inference.submit import make_submission

    if bool(run) == bool(ensemble):
        raise MelafastError("pass either --run DIR (repeatable) or --ensemble FILE")
    runs, method, weights = [str(r) for r in run or []], blend.value, None
    if ensemble is not None:
        ens = read_ensemble(ensemble)
        runs, method, weights = ens["runs"], ens["blend"], ens["weights"]
    path = make_submission(runs, data=data, tta=tta, blend_method=method, out=out, bs=bs, num_workers=workers,
                           images=images, on_bad_image=on_bad_image.value, weights=weights, log=typer.echo,
                           precision=_value(precision), stack=stack)
    if upload:
        from ..data.kaggle import upload_submission

        upload_submission(path, message)
        typer.echo(f"uploaded {path} to Kaggle")


@app.command()
@friendly
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
    precision: RunPrecisionOpt = None,
):
    """Label the confident test images with a run's predictions, for `melafast train --pseudo`."""
    check_run(run)
    from ..train.pseudo import pseudo_labels

    pseudo_labels(run, data=data, out=out, low=low, high=high, hard=hard, tta=tta, bs=bs, num_workers=workers,
                  images=images, log=typer.echo, precision=_value(precision))


@app.command("ensemble")
@friendly
def ensemble_cmd(
    run: Annotated[List[Path], typer.Option("--run", help="Finished run folder; repeat for every run to blend.")],
    out: Annotated[Path, typer.Option("--out", help="Ensemble file to write (for submit --ensemble).")] = Path("ensemble.json"),
):
    """Score equal and weighted blends of runs on their OOF predictions (weights cross-fitted); keep the best."""
    from ..inference.blend import ensemble_runs

    ensemble_runs([str(r) for r in run], out=out, log=typer.echo)


@app.command()
@friendly
def export(
    run: FinishedRunOpt,
    out: Annotated[Path, typer.Option("--out", help="New (or empty) folder for the ONNX models and their manifest.")],
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
):
    """Export a run's fold models to ONNX, with its TTA, metadata encoding and operating point (see melafast.onnx)."""
    check_run(run)
    from ..deploy.export import export_run

    export_run(run, out, opset=opset, log=typer.echo)


@app.command()
@friendly
def serve(
    run: FinishedRunOpt,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface, without "
                                      "authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 7860,
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest upload accepted, in MB.")] = 20,
    max_megapixels: Annotated[float, typer.Option("--max-megapixels", help="Largest image accepted, in millions of "
                                                  "pixels (read from its header before decoding).")] = 40.0,
    threads: Annotated[int, typer.Option("--threads", help="Requests handled at once (the others wait).")] = 8,
    precision: RunPrecisionOpt = None,
):
    """A local web page to try a run: drop images, see the probability, the decision and the Grad-CAM map."""
    check_run(run)
    from ..deploy.serve import serve as run_server

    run_server(run, host=host, port=port, max_mb=max_mb, precision=_value(precision), log=typer.echo,
               max_megapixels=max_megapixels, threads=threads)


@app.command("stack")
@friendly
def stack_cmd(
    run: FinishedRunOpt,
    cat: Annotated[Optional[List[str]], typer.Option("--cat", help="Categorical table column for the stack "
                                                     "(repeatable; default: the run's metadata columns).")] = None,
    cont: Annotated[Optional[List[str]], typer.Option("--cont", help="Continuous table column (repeatable).")] = None,
    patient_features: Annotated[bool, typer.Option("--patient-features", help="Add each continuous column's z-score "
                                                   "and rank within the patient.")] = False,
    data: RunDataOpt = None,
    model: Annotated[str, typer.Option("--model", help="What models the table: trees (scikit-learn's, needs nothing "
                                       "more), lightgbm, xgboost, catboost (pip install 'melafast[boost]') or logistic "
                                       "(a baseline).")] = "trees",
    bags: Annotated[int, typer.Option("--bags", help="Models per fold, each on 80% of the patients (seed-bagged), "
                                      "their margins averaged.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="The bags' and the models' seed.")] = 0,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Paired bootstrap resamples (whole patients).")] = 1000,
):
    """A model of the table and the run's out-of-fold image scores, cross-fitted on its folds, that never ranks
    worse than the image score alone (the table's weight is chosen on inner folds, 0 keeps the image score)."""
    check_run(run)
    from ..data import resolve_columns
    from ..inference.learners import learner
    from ..runfolder import RunFolder
    from ..inference.stack import stack_run

    learner(model)  # an unknown model, or its library missing: said before any table is read
    if cat or cont:  # the same checks as train's: present, not the label, not train-only
        d = RunFolder(run).data_for(data)
        cat, cont = resolve_columns(_stack_table(d, "train"), _stack_table(d, "test"), cat or [], cont or [],
                                    log=typer.echo)
    stack_run(run, cat=cat, cont=cont, patient_features=patient_features, data=data, model=model, bags=bags,
              seed=seed, n_boot=bootstrap, log=typer.echo)


def _stack_table(data, split):
    from ..data import read_table
    from ..layout import split_csv

    csv = split_csv(data, split)
    return read_table(csv) if csv.is_file() else None
