"""The commands that evaluate a run: report, operating-point, evaluate, recalibrate, calibrate, audit, card, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import MelafastError
from .app import app, friendly
from .options import BootstrapOpt, BsOpt, FinishedRunOpt, ImagesOpt, RunDataOpt, RunPrecisionOpt, RunTtaOpt, WorkersOpt
from .options import check_run
from .options import value as _value


@app.command()
@friendly
def report(
    run: FinishedRunOpt,
    data: RunDataOpt = None,
    images: ImagesOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default <run>/report.html); "
                                                "its figures go to <out stem>_figures/.")] = None,
    errors: Annotated[int, typer.Option("--errors", help="Images per error grid (missed melanomas, false alarms) "
                                        "with Grad-CAM maps; 0 leaves the grids out.")] = 8,
    importance: Annotated[bool, typer.Option("--importance/--no-importance", help="What each patient field "
                                             "adds: each blanked in turn (one pass over the out-of-fold images).")] = True,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the AUC intervals.")] = 1000,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    precision: RunPrecisionOpt = None,
    operating_point: Annotated[Optional[str], typer.Option(
        "--operating-point", help="Choose this operating point on the out-of-fold predictions and save it in the run "
        "(threshold.json): sens90 (sensitivity at least 90%), spec95 (specificity at least 95%), any sensNN/specNN, "
        "or a probability threshold such as 0.3. `melafast predict` then adds a decision column.")] = None,
    prevalence: Annotated[Optional[float], typer.Option(
        "--prevalence", help="Also give PPV and NPV where this share of lesions are melanomas (e.g. 0.02 for a "
        "screening population; the data's own share is always given).")] = None,
    audit: Annotated[bool, typer.Option("--audit/--no-audit", help="The shortcut audit (see `melafast audit`): one "
                                        "plain-view pass over the out-of-fold images per artefact.")] = True,
    replace: Annotated[bool, typer.Option("--replace", help="Let --operating-point replace a calibrated operating "
                                          "point (one chosen by `melafast calibrate`).")] = False,
    rerun_audit: Annotated[bool, typer.Option("--rerun-audit", help="Run the shortcut audit again even when one of "
                                              "these models is saved (by `melafast audit` or an earlier report).")]
    = False,
):
    """Write an HTML report of a run: where its models succeed and fail (AUC interval, curves, calibration, ...)."""
    from ..evaluate.report import run_report

    if errors < 0 or bootstrap < 1:
        raise MelafastError("--errors must be 0 or more and --bootstrap at least 1")
    run_report(run, data=data, out=out, images=images, n_errors=errors, importance=importance, n_boot=bootstrap, bs=bs,
               num_workers=workers, log=typer.echo, precision=_value(precision), operating_point=operating_point,
               prevalence=prevalence, audit=audit, replace=replace,
               rerun_audit=rerun_audit)


@app.command("operating-point")
@friendly
def operating_point_cmd(
    run: FinishedRunOpt,
    goal: Annotated[str, typer.Option(
        "--goal", help="sens90 (sensitivity at least 90%), spec95 (specificity at least 95%), any sensNN/specNN, or a "
        "probability threshold such as 0.3.")] = "sens90",
    prevalence: Annotated[Optional[float], typer.Option(
        "--prevalence", help="Also give PPV and NPV where this share of lesions are melanomas.")] = None,
    bootstrap: BootstrapOpt = 1000,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a calibrated operating point already saved in "
                                          "the run.")] = False,
):
    """Choose an operating point on the run's out-of-fold predictions (cross-fitted) and save it: predict then adds a
    decision. (`report --operating-point` does the same; `calibrate` chooses one on patients the run never saw.)"""
    from ..evaluate.operating import save_operating_point
    from ..record import figure_in_words

    if bootstrap < 1:
        raise MelafastError("--bootstrap must be at least 1")
    point = save_operating_point(run, goal, prevalence, bootstrap, replace=replace, log=typer.echo)
    cf = point.crossfit
    how = ("it could not be cross-fitted (one fold)" if cf.get("sensitivity") is None else
           f"cross-fitted (each fold judged by a threshold chosen on the others): sensitivity "
           f"{figure_in_words(cf['sensitivity'])}, specificity {figure_in_words(cf['specificity'])}")
    typer.echo(f"operating point {point.operating_point} ({point.goal}): threshold {point.threshold:.4f}, chosen on "
               f"{point.chosen_on}; {point.rule}; {how}; saved in {Path(run) / 'threshold.json'}")


@app.command()
@friendly
def evaluate(
    run: FinishedRunOpt,
    data: Annotated[Optional[Path], typer.Option("--data", help="Labelled images from elsewhere: a dataset folder "
                                                 "whose train.csv lists image_name, target and metadata (any layout "
                                                 "melafast reads).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image folder (with --labels; or with --data when "
                                                   "detection does not find it).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of image_name, target and any metadata for "
                                                   "the images of --images.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the evaluation (default: the data folder's "
                                                "name); it is written to <run>/evaluations/NAME/.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write (default <run>/evaluations/NAME).")]
    = None,
    group_by: Annotated[Optional[List[str]], typer.Option("--group-by", help="Another column to show subgroups of "
                                                          "(repeatable); sex, age, site, attribution, dx_type and "
                                                          "diagnosis are shown where present.")] = None,
    errors: Annotated[int, typer.Option("--errors", help="Images per error grid with Grad-CAM maps; 0 leaves the "
                                        "grids out.")] = 8,
    bootstrap: BootstrapOpt = 1000,
    tta: RunTtaOpt = None,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    precision: RunPrecisionOpt = None,
):
    """Score labelled images from another clinic with the run, as predict does, and write a page beside the run's own
    out-of-fold figures: AUC with intervals, with and without metadata, calibration, subgroups, the saved operating
    point there, the worst errors."""
    check_run(run)
    if data is None and (images is None or labels is None):
        raise MelafastError("evaluate needs labelled images: --data FOLDER (a train.csv), or --images DIR --labels CSV")
    if errors < 0 or bootstrap < 1:
        raise MelafastError("--errors must be 0 or more and --bootstrap at least 1")
    from ..evaluate.external import evaluate_run

    evaluate_run(run, data=data, images=images, labels=labels, out=out, name=name, group_by=group_by or (),
                 n_boot=bootstrap, n_errors=errors, tta=tta, bs=bs, num_workers=workers, precision=_value(precision),
                 log=typer.echo)


@app.command()
@friendly
def recalibrate(
    run: FinishedRunOpt,
    data: Annotated[Optional[Path], typer.Option("--data", help="Fit on a calibration set (a folder whose train.csv "
                                                 "lists labelled images of patients the run never trained on), scored "
                                                 "as predict scores; default: the run's out-of-fold rows.")] = None,
    images: ImagesOpt = None,
    folds: Annotated[int, typer.Option("--folds", help="Patient-grouped parts of the calibration set the effect is "
                                       "cross-fitted on (the out-of-fold rows use the run's folds).")] = 5,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
):
    """Fit a monotone recalibration of predict's probability (a temperature and a shift on the logit) and save it in
    the run: every surface then adds pred_calibrated; rankings and decisions are unchanged."""
    check_run(run)
    if folds < 2:
        raise MelafastError("--folds must be at least 2")
    from ..evaluate.recalibrate import recalibrate_run

    recalibrate_run(run, data=data, images=images, folds=folds, bs=bs, num_workers=workers, log=typer.echo)


@app.command()
@friendly
def calibrate(
    run: FinishedRunOpt,
    data: Annotated[Path, typer.Option("--data", help="Calibration set: a folder whose train.csv lists labelled "
                                       "images (image_name, target, metadata) of patients the run never trained on.")],
    images: ImagesOpt = None,
    operating_point: Annotated[str, typer.Option(
        "--operating-point", help="The goal: sens90 (sensitivity at least 90%), spec95, any sensNN/specNN.")] = "sens90",
    prevalence: Annotated[Optional[float], typer.Option(
        "--prevalence", help="Also give PPV and NPV where this share of lesions are melanomas.")] = None,
    bootstrap: BootstrapOpt = 1000,
    folds: Annotated[int, typer.Option("--folds", help="Patient-grouped parts of the calibration set its figures "
                                       "are cross-fitted on.")] = 5,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a calibrated operating point already saved in "
                                          "the run.")] = False,
):
    """Choose an operating point on a calibration set, on predict's own scale (the fold mean), and save it in the run:
    `predict` then decides by the fold mean against it."""
    check_run(run)
    from ..evaluate.calibrate import calibrate_operating_point

    if bootstrap < 1 or folds < 2:
        raise MelafastError("--bootstrap must be at least 1 and --folds at least 2")
    calibrate_operating_point(run, operating_point, data=data, images=images, prevalence=prevalence, n_boot=bootstrap,
                              bs=bs, num_workers=workers, folds=folds, log=typer.echo, replace=replace)


@app.command()
@friendly
def audit(
    run: FinishedRunOpt,
    artefact: Annotated[Optional[List[str]], typer.Option("--artefact", help="Artefact to draw; repeat for several "
                                                          "(default all: ink, ruler, vignette, hair, patch).")] = None,
    data: RunDataOpt = None,
    images: ImagesOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default <run>/audit.html); the "
                                                "table goes beside it as .csv, the figures to <out stem>_figures/.")]
    = None,
    bootstrap: BootstrapOpt = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seeds where each artefact is drawn on each image.")] = 0,
    tta: Annotated[int, typer.Option("--tta", help="Dihedral views per image (1: the plain view).")] = 1,
    bs: BsOpt = 64,
    workers: WorkersOpt = None,
    precision: RunPrecisionOpt = None,
):
    """Shortcut audit: draw ink, rulers, vignettes, hair and colour patches on the out-of-fold images; flag the ones
    that move the run's scores."""
    check_run(run)
    from ..evaluate.audit import audit_run

    if bootstrap < 1:
        raise MelafastError("--bootstrap must be at least 1")
    audit_run(run, artefact, data=data, images=images, out=out, n_boot=bootstrap, seed=seed, tta=tta, bs=bs,
              num_workers=workers, log=typer.echo, precision=_value(precision))


@app.command()
@friendly
def card(
    run: FinishedRunOpt,
    data: RunDataOpt = None,
    images: ImagesOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Markdown file to write (default <run>/MODEL_CARD.md).")]
    = None,
    bootstrap: BootstrapOpt = 1000,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="The training data's source, when the card does "
                                                   "not recognise it (SIIM-ISIC 2020, HAM10000, ISIC 2024 are).")]
    = None,
    license: Annotated[Optional[str], typer.Option("--license", help="Its licence (e.g. cc-by-nc-4.0).")] = None,
):
    """Write the run's model card (Hugging Face format) from what the run folder knows."""
    from ..evaluate.card import model_card

    if bootstrap < 1:
        raise MelafastError("--bootstrap must be at least 1")
    model_card(run, out=out, data=data, images=images, n_boot=bootstrap, log=typer.echo, dataset=dataset,
               license=license)


@app.command()
@friendly
def compare(
    runs: Annotated[Optional[List[Path]], typer.Argument(help="Run folders (as --run: either way, two or more).",
                                                         show_default=False)] = None,
    run: Annotated[Optional[List[Path]], typer.Option("--run", help="A finished run folder; repeat it: each later run "
                                                      "is compared with the first.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the first run's).")] = None,
    images: ImagesOpt = None,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write; its figures go to <out stem>_figures/.")]
    = Path("compare.html"),
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Paired bootstrap resamples (whole patients).")] = 1000,
):
    """Compare runs on the out-of-fold images they all scored: AUC and pAUC differences with paired intervals."""
    from ..evaluate.compare import compare_runs

    runs = [*(run or []), *(runs or [])]
    if len(runs) < 2:
        raise MelafastError("compare needs at least two run folders: --run A --run B")
    compare_runs(runs, data=data, out=out, images=images, n_boot=bootstrap, log=typer.echo)
