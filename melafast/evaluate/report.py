"""`melafast report`: one self-contained HTML page on where a run's models succeed and fail, and its figures as PNGs.

Everything comes from the run's honest out-of-fold predictions, its fold models and its data folder:
the AUC with a patient-level bootstrap interval, ROC and precision-recall curves with clinical operating points,
calibration, subgroup AUCs, the worst errors with Grad-CAM maps, what the metadata adds, and the training curves.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import pandas as pd

from ..runfolder import RunFolder
from .figures import Evaluation
from .gallery import error_section
from .pages import headline_table, image, interval, note, page, para, table
from .runview import fold_models, oof_with_metadata, read_run

__all__ = ["run_report", "SECTIONS"]

SECTIONS = {"summary": "Summary", "curves": "Curves and operating points", "calibration": "Calibration",
            "subgroups": "Subgroups", "errors": "Worst errors, explained", "shortcuts": "Shortcut audit",
            "metadata": "What the metadata adds",
            "training": "Training"}


# --------------------------------------------------------------------------------------------------
# Sections


def _summary(config, results, ev: Evaluation, data, run: RunFolder) -> str:
    s = config.settings
    lr = "lr_find valley per fold" if s.lr is None else s.lr
    settings = {k: getattr(s, k) for k in ("arch", "size", "epochs", "freeze_epochs", "bs", "folds", "meta", "tta",
                                           "keep", "aug", "upsample", "ema", "swa", "pseudo", "external", "seed",
                                           "group_by", "color_constancy")}
    settings.update(lr=lr, lr_mult=s.lr_mult, pretrained=s.weights or s.pretrained)
    if s.meta:
        cat, cont = config.metadata_columns
        settings["metadata columns"] = ("categorical " + ", ".join(cat) + "; continuous " + ", ".join(cont)
                                        + ("; each continuous column also against the same patient's other lesions"
                                           if s.patient_features else "")
                                        + ("; plus images per patient and log file size" if s.extra_meta else ""))
    rows = [dict(setting=k, value=str(v)) for k, v in settings.items()]
    rows += [dict(setting=f"version of {k}", value=str(v)) for k, v in config.versions.items()]
    folds = ev.per_fold.assign(kept_epoch=lambda f: [str(results.kept_epochs.get(str(k), "")) for k in f["fold"]])
    h = ev.headline.iloc[0]
    out = [para(f"Data: {data}: {ev.n_images} out-of-fold images, {ev.n_melanomas} melanomas"
                + (f", {ev.n_patients} patients" if ev.n_patients is not None else "")
                + (f"; {config.n_external} external images trained but are never scored"
                   if config.n_external else "") + "."),
           f"<p><b>Out-of-fold {html.escape(h.figure)} {h.value:.{h.digits}f}</b> ({ev.level:.0%} interval "
           f"{interval(h.lo, h.hi, h.digits)}, {ev.n_boot} bootstrap resamples of whole "
           f"{'patients' if ev.n_patients is not None else 'images'}). "
           + html.escape(f"Each fold kept {results.epoch_rule or 'its epoch as the run says'}.") + "</p>",
           headline_table(ev.headline, ev.level)]
    low = ev.below_whole()
    if len(low):
        out.append(note("Served worse: " + "; ".join(f"{r.variable} {r.group} (AUC {r.auc:.3f}, {r.lo:.3f} to "
                                                     f"{r.hi:.3f}, {r.images} images)" for r in low.itertuples())
                        + f": each interval lies below the AUC of all images ({ev.value('auc'):.3f}). See Subgroups."))
    if results.oof_auc_no_meta is not None:
        drop = config.settings.meta_dropout or 0
        if config.settings.image_head:  # runs saved before the image head have none
            how = ("They are scored by the model's image-only head, trained on every training image beside the joint "
                   "head" + (f"; metadata dropout ({drop}) trains the joint head for rows missing some fields."
                             if drop else "."))
        elif drop:
            how = (f"The run was trained for that path: each training row's fields were blanked with probability "
                   f"{drop} (metadata dropout).")
        else:
            how = ("The run learned that path only from training rows that happened to have holes (no metadata "
                   "dropout): predictions without metadata rest on them.")
        out.append(para(f"With every patient field blanked at prediction (a patient who comes with images only), the same "
                      f"out-of-fold images score AUC {results.oof_auc_no_meta:.4f}. " + how))
    if results.cv_note:
        out.append(note(f"This CV is {results.cv_note}."))
    from .external import evaluation_in_words, external_evaluations

    found = external_evaluations(run)
    out.append(para("Evaluated elsewhere (`melafast evaluate`): " + " ".join(evaluation_in_words(e) for e in found))
               if found else note("Every figure on this page comes from the clinic the run trained on: `melafast "
                                  "evaluate --run RUN --data OTHER_CLINIC` measures it on patients from elsewhere."))
    if results.oof_auc_selected is not None:
        out.append(f'<p class="note">The kept epochs score {results.oof_auc_selected:.4f} on the same rows: '
                   "optimistic, since they were chosen on them. The figures here use the honest last-epoch predictions.</p>")
    return "\n".join([*out, "<h3>AUC per fold</h3>", table(folds), "<h3>Settings</h3>", table(pd.DataFrame(rows))])


def _curves(ev: Evaluation, figdir, operating_point=None, prevalence=None) -> tuple[str, pd.DataFrame]:
    from ..metrics import operating_points
    from .operating import STANDARD_GOALS, parse_goal
    from .plots import plot_roc_pr

    df, n_boot = ev.rows, ev.n_boot
    points = operating_points(df["target"], df["pred"])
    fig = plot_roc_pr(df["target"], df["pred"], points, figdir / "roc_pr.png")
    goals = list(STANDARD_GOALS)
    if operating_point is not None and parse_goal(operating_point)["name"] not in goals:
        goals.append(parse_goal(operating_point)["name"])
    points_table = ev.operating(goals, prevalence)
    shown = point_rows(points_table)
    text = [para("Operating points as they hold on new patients (cross-fitted): each fold's threshold is chosen on the "
               "other folds' out-of-fold images only and applied to that fold, so no image is judged by a threshold "
               "chosen on it. Sensitivity, specificity, and the predictive values (PPV: the share of melanoma calls "
               "that are melanomas; NPV: the share of cleared lesions that are benign; both depend on the prevalence, the "
               "share of melanomas, in their column) at the data's prevalence"
               + (f" and at {prevalence:.1%}" if prevalence is not None else " (pass --prevalence for another, e.g. "
                  "0.02 for a screening population like ISIC 2020's)")
               + f", with 95% intervals from {n_boot} bootstrap resamples of whole patients. The threshold column is "
               "the one chosen on all out-of-fold images (what --operating-point saves); the in-sample column scores "
               "it on the images it was chosen on: optimistic, shown for comparison only."),
            *(['<p class="note">This run has out-of-fold predictions of one fold only: there are no other folds to '
               "choose a threshold on, so there are no cross-fitted figures; the in-sample ones are optimistic.</p>"]
              if df["fold"].nunique() < 2 else []),
            table(shown),
            para("The ROC below marks the same goals chosen and scored on all out-of-fold images (in-sample, "
               "optimistic), with precision-recall beside it."),
            image(fig), table(points.rename(columns={"goal": "goal (in-sample, optimistic)"}))]
    return "\n".join(text), points_table


def point_rows(table: pd.DataFrame) -> pd.DataFrame:
    """`operating_table`'s rows (one per point and measure) as one row per operating point: its threshold, then each
    cross-fitted measure (PPV and NPV at each prevalence) as "value (lo to hi)", then the in-sample sensitivity and
    specificity (optimistic)."""
    def cell(r):
        if pd.isna(r["cross-fitted"]):
            return "not cross-fitted"
        return f"{r['cross-fitted']:.3f}" + ("" if pd.isna(r["lo"]) else f" ({r['lo']:.3f} to {r['hi']:.3f})")

    rows = []
    for name, part in table.groupby("operating point", sort=False):
        row = {"operating point": name, "threshold": f"{part['threshold'].iloc[0]:.4f}"}
        for r in part.to_dict("records"):
            label = r["measure"] + ("" if pd.isna(r["prevalence"]) else f" at {r['prevalence']:.1%}")
            row[label] = cell(r)
        for r in part[part["prevalence"].isna()].to_dict("records"):
            row[f"in-sample {r['measure']} (optimistic)"] = f"{r['in-sample (optimistic)']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _by_diagnosis(calls) -> str:
    """Which diagnoses the point in force calls melanoma (`calls_by_diagnosis`; empty when the data names no
    diagnosis): its specificity on each benign diagnosis and its sensitivity on melanomas."""
    if calls is None:
        return ""
    rows, how = calls
    return ("<h4>Who the point calls melanoma, by diagnosis</h4>"
            + para(f"From {how}. On a benign diagnosis the share called melanoma is 1 - its specificity: the false "
                   "alarms this point raises on it.") + table(rows, 3))


def _saved_point(point) -> str:
    from ..record import figure_in_words

    cf = point.crossfit
    where = (" on the calibration set (each patient-grouped part of it judged by a threshold chosen on the others)"
             if point.scale == "ensemble" else "")
    how = ("It could not be cross-fitted (one fold)." if cf["sensitivity"] is None else
           f"Cross-fitted{where}, a threshold chosen this way reaches sensitivity "
           f"{figure_in_words(cf['sensitivity'])} and specificity {figure_in_words(cf['specificity'])}.")
    return (f'<h3 id="point-in-force">Operating point in force: {html.escape(point.goal)}</h3>' + para(
        f"Threshold {point.threshold:.4f} on the melanoma probability, chosen on {point.chosen_on}; saved in "
        f"threshold.json. {how} `melafast predict` and `load_predictor(run).predict_frame` add a decision column: "
        f"{point.rule}." + ("" if point.scale == "ensemble" else
        " A point chosen on out-of-fold scores is carried to the fold ensemble by this vote, and what it reaches on "
        "new patients moves with the few low-scored melanomas of the CV it was chosen on; with labelled patients "
        "the run never saw, `melafast calibrate` chooses it on predict's own scale instead."))
        + (para(both) if (both := point.paths_in_words()) else ""))


def _calibration(config, ev: Evaluation, figdir, folder: RunFolder) -> str:
    from .plots import plot_reliability

    cal = ev.calibration
    fig = plot_reliability(cal["bins"], cal["ece"], cal["brier"], figdir / "calibration.png")
    s = config.settings
    notes = []
    if (s.upsample or 1) > 1:
        notes.append(f"This run showed each training melanoma {s.upsample} times per epoch: its probabilities "
                     "overstate the melanoma rate and are not calibrated.")
    if s.pseudo:
        notes.append("This run trained on pseudo-labels (soft targets from another model): its probabilities are not "
                     "calibrated.")
    notes.append("Averages over TTA views and fold models also pull probabilities towards the middle; rank-based "
                 "figures (AUC, operating points) do not depend on calibration.")
    recal = []
    if (r := folder.recalibration()) is not None:
        from .recalibrate import recalibration_table

        recal = [para(f"Recalibration saved (`melafast recalibrate`), fitted on {r.fitted_on}: p' = sigmoid("
                      f"{r.slope:.3f} x logit(p) {r.shift:+.3f}). Cross-fitted there, it moves the figures as below; "
                      "predict, serve and the ONNX runtime add pred_calibrated. It is monotone: the AUC, the curves "
                      "and every decision are those of the probability itself."), table(recalibration_table(r))]
    else:
        recal = [para("No recalibration saved: `melafast recalibrate --run RUN` fits one (on the out-of-fold rows, "
                      "or --data a calibration set), and predict then adds pred_calibrated.")]
    return "\n".join([image(fig), para(f"Expected calibration error {cal['ece']:.4f}, Brier score {cal['brier']:.4f}."),
                      *map(note, notes), *recal, table(cal["bins"])])


def _subgroups(config, ev: Evaluation, figdir) -> str:
    from .plots import plot_subgroups

    groups = ev.subgroups()
    fig = plot_subgroups(groups, dict(auc=ev.value("auc")), figdir / "subgroups.png")
    text = ["AUC per group with a 95% bootstrap interval (whole patients resampled); groups with fewer than 5 "
            "melanomas get no AUC. The counts of each variable add up to all out-of-fold images."]
    if config.n_external:
        text.append(f"The run also trained on {config.n_external} external images; they only ever train, so "
                    "there is no out-of-fold score for them: every figure here is on the main data.")
    if "skin_tone" in ev.rows.columns:
        from ..data.signatures import SKIN_TONE_NOTE

        text.append(SKIN_TONE_NOTE)
    return "\n".join([image(fig), *map(para, text), table(groups)])


def _metadata(config, models, df, figdir, bs, num_workers, device, precision=None) -> str:
    from .explain import metadata_importance
    from .plots import plot_importance

    if not config.settings.meta:
        return para("This run uses the image only (--no-meta): there is no metadata to weigh.")
    importance = metadata_importance(models, df, bs=bs, num_workers=num_workers, device=device, precision=precision)
    rows = importance.set_index("field")
    given, alone = rows.loc["all fields given", "auc"], rows.loc["every field blanked", "auc"]
    text = [para("Each patient field blanked in turn, as for a patient who comes without it: the path the model takes "
                 "then, which training prepared it for (metadata dropout). The AUC drop says how much the model "
                 "relies on the field; a negative drop, that it does better without it here. Every field blanked is "
                 "the image path alone, what a patient without metadata gets. Plain view, no TTA."),
            para(f"All fields given: AUC {given:.4f}; the image path alone: {alone:.4f}. "
                 + (f"The metadata adds {given - alone:+.4f} AUC on these images." if given >= alone else
                    f"The image path alone scores {alone - given:.4f} higher: on these images the metadata costs AUC.")
                 )]
    return "\n".join([image(plot_importance(importance, figdir / "metadata_importance.png")), *text, table(importance)])


def _training(run: RunFolder) -> str:
    parts = []
    if run.curves_file.is_file():  # (the OOF ROC is in "Curves and operating points", with the operating points)
        parts += [f"<h3>{html.escape('losses and validation AUC per epoch and fold')}</h3>", image(run.curves_file)]
    for f in run.lr_find_files():
        parts += [f"<h3>lr_find, {html.escape(f.parent.name)}</h3>", image(f)]
    metrics = run.metrics()
    if metrics is not None:
        parts += [f"<h3>{html.escape(run.metrics_file.name)}</h3>", table(metrics)]
    return "\n".join(parts) or para("The run folder holds no training plots.")


def run_report(run, data=None, out=None, images=None, n_errors: int = 8, importance: bool = True,
               n_boot: int = 1000, bs: int = 64, num_workers: int | None = None, device=None,
               log: Callable = print, precision: str | None = None, operating_point: str | None = None,
               prevalence: float | None = None, audit: bool = True, replace: bool = False,
               rerun_audit: bool = False) -> Path:
    """Write `out` (default the run's report.html): a self-contained HTML page (figures embedded, no network needed),
    and its figures as PNGs in `<out stem>_figures/`. `data` defaults to the run's data folder; `n_errors` images
    per error grid (0: none); `importance=False` skips the metadata importance (one pass over the OOF images).
    The model passes (Grad-CAM, importance) run each model in the precision it was validated with, or `precision`.
    `operating_point` (sens90, spec95, ..., or a threshold; see `operating.parse_goal`) is chosen on the out-of-fold
    predictions and saved in the run's threshold.json, from which `predict` adds a decision; `prevalence` adds the
    predictive values at that share of melanomas. `audit=False` leaves out the shortcut audit (see `audit`: one
    plain-view pass over the out-of-fold images per artefact; an audit of these models already saved, by `melafast
    audit` or an earlier report, is shown again unless `rerun_audit`). A calibrated operating point (`melafast calibrate`) is
    replaced by `operating_point` only with `replace`; without `operating_point` the page shows the point in force.
    """
    from ..atomic import write_text
    from .operating import calls_by_diagnosis, check_replace, flags_in_words, parse_goal, prevalences

    folder = RunFolder(run)
    if operating_point is not None:
        parse_goal(operating_point)  # a bad one stops before any work
        check_replace(folder, replace)  # a calibrated point there stops it, named, before any work
    prevalences([0, 1], prevalence)
    config, oof = read_run(folder)
    results = folder.figures()
    df, data = oof_with_metadata(folder, config, oof, data, images)
    ev = Evaluation(df, n_boot=n_boot)
    out = Path(out) if out is not None else folder.report_file
    figdir = out.parent / f"{out.stem}_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    log(f"report on {run}: {len(df)} out-of-fold images from {data}")
    sections = {"summary": _summary(config, results, ev, data, folder)}
    sections["curves"], points_table = _curves(ev, figdir, operating_point, prevalence)
    if operating_point is not None:
        from .operating import save_operating_point

        point = save_operating_point(folder, operating_point, prevalence, n_boot, table=points_table, replace=replace,
                                     log=log)
        log(f"saved operating point {point.operating_point} (threshold {point.threshold:.4f}) to "
            f"{folder.operating_point_file}: `melafast predict` adds a decision column from it")
    else:
        point = folder.operating_point()  # the point predict decides by, as it was saved (None: no point)
    if point is not None:
        calls = calls_by_diagnosis(df, point)
        sections["curves"] += _saved_point(point) + _by_diagnosis(calls)
        if calls is not None:  # the summary names the benign diagnoses it flags
            sections["summary"] += note(flags_in_words(calls, point) + " See Curves and operating points.")
    sections["calibration"] = _calibration(config, ev, figdir, folder)
    sections["subgroups"] = _subgroups(config, ev, figdir)
    models = fold_models(folder) if n_errors > 0 or importance or audit else {}
    sections["errors"] = (error_section(models, df, figdir, n_errors, bs, num_workers, device, precision) if n_errors > 0
                          else para("Left out (n_errors=0)."))
    if audit:
        from .audit import audit_section

        from ..atomic import write_csv

        saved = None if rerun_audit else folder.audit_path(current=True)  # read before this page rewrites it
        sections["shortcuts"], audit_table = audit_section(folder, config, models, df, figdir, n_boot=n_boot, bs=bs,
                                                           num_workers=num_workers, device=device,
                                                           precision=precision, log=log, saved=saved)
        write_csv(audit_table, figdir / "audit.csv")
    else:
        sections["shortcuts"] = para("Left out (--no-audit).")
    sections["metadata"] = (_metadata(config, models, df, figdir, bs, num_workers, device, precision)
                            if importance else para("Left out (--no-importance)."))
    sections["training"] = _training(folder)
    write_text(page(f"melafast report: {Path(run).name}", sections, SECTIONS), out)
    log(f"wrote {out} and its figures in {figdir}")
    return out
