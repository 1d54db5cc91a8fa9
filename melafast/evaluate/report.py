"""`melafast report`: one self-contained HTML page on where a run's models succeed and fail, and its figures as PNGs.

Everything comes from the run's honest out-of-fold predictions, its fold models and its data folder:
the AUC with a patient-level bootstrap interval, ROC and precision-recall curves with clinical operating points,
calibration, subgroup AUCs, the worst errors with Grad-CAM maps, what the metadata adds, and the training curves.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, RunError
from ..runfolder import RunFolder

__all__ = ["run_report", "SECTIONS"]

SECTIONS = {"summary": "Summary", "curves": "Curves and operating points", "calibration": "Calibration",
            "subgroups": "Subgroups", "errors": "Worst errors, explained", "shortcuts": "Shortcut audit",
            "metadata": "What the metadata adds",
            "training": "Training"}
SITE = "anatom_site_general_challenge"


def _read_run(run: RunFolder) -> tuple:
    "(the run's `RunInfo`, its out-of-fold rows), checked to hold both classes."
    info = run.info()
    oof = run.oof(need="the report is made from a run's out-of-fold predictions")
    if oof.empty or oof["target"].nunique() < 2:
        raise RunError(f"{run.oof_file} needs melanomas and benign lesions for an AUC")
    return info, oof


def _oof_with_metadata(run: RunFolder, config, oof, data, images) -> tuple[pd.DataFrame, Path]:
    "The OOF rows with their images and metadata from the run's data folder (or `data`)."
    from ..data import add_meta_features, load_split
    from ..inference.inputs import clean_table

    data = run.data_for(data)
    train = load_split(data, "train", images=images)
    missing = oof.loc[~oof["image_name"].isin(train["image_name"]), "image_name"]
    if len(missing):
        raise DataError(f"{data} does not hold the images of {run.path}: {len(missing)} of its {len(oof)} out-of-fold "
                        f"images are not in its train.csv (e.g. {', '.join(missing.head(3))}); pass --data PATH")
    if config.settings.meta:  # the metadata read as training and predict read it (inference.inputs)
        cat, cont = config.metadata_columns
        train = clean_table(train, cat, cont, cont if config.settings.patient_features else ())
    if config.settings.extra_meta:
        train = add_meta_features(train)  # as in training: computed over the whole training table
    df = oof.merge(train.drop(columns=["target", "fold"], errors="ignore"), on="image_name", how="left")
    return df, data


# --------------------------------------------------------------------------------------------------
# Page building


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def _table(df: pd.DataFrame, digits: int = 4) -> str:
    return df.to_html(index=False, border=0, escape=True, na_rep="",
                      float_format=lambda v: f"{v:.{digits}f}", classes="t")


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}img{max-width:100%}
table.t{border-collapse:collapse;font-size:.85em;margin:.6em 0}table.t td,table.t th{padding:.2em .6em;
border-bottom:1px solid #eee;text-align:right}nav a{margin-right:1em}.note{color:#a33}"""


def _page(title: str, sections: dict, names: dict) -> str:
    "One self-contained page: `title`, a link to each section, and the sections (id -> HTML), headed by `names`."
    nav = " ".join(f'<a href="#{k}">{html.escape(names[k])}</a>' for k in sections)
    body = "\n".join(f'<section id="{k}"><h2>{html.escape(names[k])}</h2>\n{v}\n</section>' for k, v in sections.items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------------------------------
# Sections


def _summary(config, results, df, data, n_boot) -> str:
    from ..metrics import PAUC_MIN_TPR, auc, bootstrap_auc, bootstrap_pauc, pauc, sens_at_spec

    s = config.settings
    ci = bootstrap_auc(df["target"], df["pred"], df.get("patient_id"), n_boot=n_boot)
    pci = bootstrap_pauc(df["target"], df["pred"], df.get("patient_id"), n_boot=n_boot)
    lr = "lr_find valley per fold" if s.lr is None else s.lr
    settings = {k: getattr(s, k) for k in ("arch", "size", "epochs", "freeze_epochs", "bs", "folds", "meta", "tta",
                                           "keep", "aug", "upsample", "ema", "swa", "pseudo", "external", "seed")}
    settings.update(lr=lr, lr_mult=s.lr_mult, pretrained=s.weights or s.pretrained)
    if s.meta:
        cat, cont = config.metadata_columns
        settings["metadata columns"] = ("categorical " + ", ".join(cat) + "; continuous " + ", ".join(cont)
                                        + ("; each continuous column also against the same patient's other lesions"
                                           if s.patient_features else "")
                                        + ("; plus images per patient and log file size" if s.extra_meta else ""))
    rows = [dict(setting=k, value=str(v)) for k, v in settings.items()]
    rows += [dict(setting=f"version of {k}", value=str(v)) for k, v in config.versions.items()]
    folds = pd.DataFrame([dict(fold=int(k), images=len(g), melanomas=int(g["target"].sum()), auc=auc(g["target"], g["pred"]),
                               pauc=pauc(g["target"], g["pred"]), sens_at_spec90=sens_at_spec(g["target"], g["pred"]),
                               kept_epoch=str(results.kept_epochs.get(str(k), "")))
                          for k, g in df.groupby("fold")])
    out = [_p(f"Data: {data}: {len(df)} out-of-fold images, {int(df['target'].sum())} melanomas"
              + (f", {df['patient_id'].nunique()} patients" if "patient_id" in df else "")
              + (f"; {config.n_external} external images trained but are never scored"
                 if config.n_external else "") + "."),
           f"<p><b>Out-of-fold ROC AUC {ci['auc']:.4f}</b> (95% bootstrap interval {ci['lo']:.4f} to {ci['hi']:.4f}, "
           f"{ci['n_boot']} resamples of whole patients); <b>partial AUC above {PAUC_MIN_TPR:.0%} sensitivity "
           f"{pci['pauc']:.4f}</b> ({pci['lo']:.4f} to {pci['hi']:.4f}; the ROC area where sensitivity is at least "
           f"{PAUC_MIN_TPR:.0%}, 0 to {1 - PAUC_MIN_TPR:.1f}: the ISIC 2024 metric); sensitivity at 90% specificity "
           f"{sens_at_spec(df['target'], df['pred'], 0.9):.3f}. "
           + html.escape(f"Each fold kept {results.epoch_rule or 'its epoch as the run says'}.") + "</p>"]
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
        out.append(_p(f"With every patient field blanked at prediction (a patient who comes with images only), the same "
                      f"out-of-fold images score AUC {results.oof_auc_no_meta:.4f}. " + how))
    if results.cv_note:
        out.append(f'<p class="note">{html.escape("This CV is " + results.cv_note)}.</p>')
    if results.oof_auc_selected is not None:
        out.append(f'<p class="note">The kept epochs score {results.oof_auc_selected:.4f} on the same rows: '
                   "optimistic, since they were chosen on them. The figures here use the honest last-epoch predictions.</p>")
    return "\n".join([*out, "<h3>AUC per fold</h3>", _table(folds), "<h3>Settings</h3>", _table(pd.DataFrame(rows))])


def _curves(df, figdir, n_boot, operating_point=None, prevalence=None) -> tuple[str, pd.DataFrame]:
    from ..metrics import operating_points
    from .operating import STANDARD_GOALS, operating_table, parse_goal
    from .plots import plot_roc_pr

    points = operating_points(df["target"], df["pred"])
    fig = plot_roc_pr(df["target"], df["pred"], points, figdir / "roc_pr.png")
    goals = list(STANDARD_GOALS)
    if operating_point is not None and parse_goal(operating_point)["name"] not in goals:
        goals.append(parse_goal(operating_point)["name"])
    table = operating_table(df["target"], df["pred"], df["fold"], df.get("patient_id"), goals, prevalence, n_boot)
    shown = table.assign(**{"95% interval": ["" if np.isnan(lo) else f"{lo:.3f} to {hi:.3f}"
                                             for lo, hi in zip(table["lo"], table["hi"])]})
    shown = shown[["operating point", "threshold", "measure", "prevalence", "cross-fitted", "95% interval",
                   "in-sample (optimistic)"]]
    text = [_p("Operating points as they hold on new patients (cross-fitted): each fold's threshold is chosen on the "
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
            _table(shown),
            _p("The ROC below marks the same goals chosen and scored on all out-of-fold images (in-sample, "
               "optimistic), with precision-recall beside it."),
            _img(fig), _table(points.rename(columns={"goal": "goal (in-sample, optimistic)"}))]
    return "\n".join(text), table


def _saved_point(point) -> str:
    cf = point.crossfit
    where = (" on the calibration set (each patient-grouped part of it judged by a threshold chosen on the others)"
             if point.scale == "ensemble" else "")
    how = ("It could not be cross-fitted (one fold)." if cf["sensitivity"] is None else
           f"Cross-fitted{where}, a threshold chosen this way reaches sensitivity {cf['sensitivity']['value']:.3f} "
           f"({cf['sensitivity']['lo']:.3f} to {cf['sensitivity']['hi']:.3f}) and specificity "
           f"{cf['specificity']['value']:.3f} ({cf['specificity']['lo']:.3f} to {cf['specificity']['hi']:.3f}).")
    return (f'<h3>Saved operating point: {html.escape(point.goal)}</h3>' + _p(
        f"Threshold {point.threshold:.4f} on the melanoma probability, chosen on {point.chosen_on}; saved in "
        f"threshold.json. {how} `melafast predict` and `load_predictor(run).predict_frame` add a decision column: "
        f"{point.rule}." + ("" if point.scale == "ensemble" else
        " A point chosen on out-of-fold scores is carried to the fold ensemble by this vote, and what it reaches on "
        "new patients moves with the few low-scored melanomas of the CV it was chosen on; with labelled patients "
        "the run never saw, `melafast calibrate` chooses it on predict's own scale instead.")))


def _calibration(config, df, figdir) -> str:
    from ..metrics import calibration
    from .plots import plot_reliability

    cal = calibration(df["target"], df["pred"])
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
    return "\n".join([_img(fig), _p(f"Expected calibration error {cal['ece']:.4f}, Brier score {cal['brier']:.4f}."),
                      *(f'<p class="note">{html.escape(n)}</p>' for n in notes), _table(cal["bins"])])


def _subgroups(config, df, figdir, n_boot) -> str:
    from ..metrics import age_band, auc, subgroup_aucs
    from .plots import plot_subgroups

    table = subgroup_aucs(df, {"sex": df["sex"], "age": age_band(df["age_approx"]), "site": df[SITE]}, n_boot=n_boot)
    fig = plot_subgroups(table, dict(auc=auc(df["target"], df["pred"])), figdir / "subgroups.png")
    text = ["AUC per group with a 95% bootstrap interval (whole patients resampled); groups with fewer than 5 "
            "melanomas get no AUC. The counts of each variable add up to all out-of-fold images."]
    if config.n_external:
        text.append(f"The run also trained on {config.n_external} external images; they only ever train, so "
                    "there is no out-of-fold score for them: every figure here is on the main data.")
    return "\n".join([_img(fig), *map(_p, text), _table(table)])


def _describe(row) -> str:
    age = "?" if pd.isna(row.get("age_approx")) else f"{row['age_approx']:.0f}"
    return f"{row.get('sex') if isinstance(row.get('sex'), str) else '?'}, {age}, " \
           f"{row.get(SITE) if isinstance(row.get(SITE), str) else '?'}"


# diagnoses that are not benign although the melanoma target calls them 0 (HAM10000 even files them as "benign"):
# a high score on one of these is not a false alarm a dermatologist would accept
NOT_BENIGN = ("basal cell carcinoma", "squamous cell carcinoma", "intraepithelial carcinoma", "actinic keratosis",
              "bowen", "merkel", "kaposi", "atypical melanocytic proliferation", "carcinoma", "melanoma")


def _diagnosis(df: pd.DataFrame) -> pd.Series:
    "Each row's diagnosis in lower case ('melanoma' / 'not given' where the data has none)."
    if "diagnosis" in df.columns:
        diag = df["diagnosis"].astype("string").str.strip().str.lower()
        return diag.where(diag.notna() & (diag != ""), "not given").astype(object)
    return pd.Series(np.where(df["target"] == 1, "melanoma", "not given"), index=df.index, dtype=object)


def galleries(df: pd.DataFrame, n: int) -> dict:
    """The error galleries: the `n` melanomas scored lowest, the `n` benign lesions scored highest and, when the data
    names them, the `n` other (non-melanoma) malignant or premalignant lesions scored highest; one image per lesion
    (`lesion_id`) or patient (`patient_id`; a row without either stands alone), the most extreme image of each; in
    each gallery grouped by diagnosis, most extreme first. Returns name -> (title, rows with a `diagnosis` column)."""
    df = df.assign(diagnosis=_diagnosis(df))
    key = next((c for c in ("lesion_id", "patient_id") if c in df.columns), None)
    who = df[key].astype(object).where(df[key].notna(), "row " + df.index.astype(str)) if key else df.index.to_series()
    df = df.assign(_who=who.to_numpy())
    not_benign = df["diagnosis"].str.contains("|".join(NOT_BENIGN), regex=True)
    picks = {"missed_melanomas": ("melanomas scored lowest", df[df["target"] == 1], True),
             "false_alarms": ("benign lesions scored highest", df[(df["target"] == 0) & ~not_benign], False),
             "other_malignant": ("other malignant or premalignant lesions (not melanoma) scored highest",
                                 df[(df["target"] == 0) & not_benign], False)}
    out = {}
    for name, (title, rows, lowest) in picks.items():
        if rows.empty:
            continue
        rows = rows.sort_values("pred", ascending=lowest, kind="mergesort").drop_duplicates("_who").head(n)
        worst = rows.groupby("diagnosis")["pred"].transform("min" if lowest else "max")  # diagnosis groups, worst first
        rows = rows.assign(_g=worst if lowest else -worst, _p=rows["pred"] if lowest else -rows["pred"])
        out[name] = (title, rows.sort_values(["_g", "diagnosis", "_p"], kind="mergesort").drop(columns=["_g", "_p", "_who"]))
    return out


def _errors(models, df, figdir, n_errors, bs, num_workers, device, precision=None) -> str:
    from .explain import describe_cam_layer
    from ..inference import resolve_settings
    from .plots import plot_cam_grid

    used = sorted({resolve_settings(m.spec, device, precision).describe() for m in models.values()}) or ["fp32"]
    layers = sorted({describe_cam_layer(m.model, m.spec.size) for m in models.values()})
    chosen = galleries(df, n_errors)
    parts = [_p("The melanomas scored lowest and the lesions scored highest that are not melanomas, one image per "
                + ("lesion" if "lesion_id" in df.columns else "patient") + " (its most extreme), grouped by diagnosis "
                "where the data gives one. Each image is shown as it is and beside its Grad-CAM map for the melanoma "
                "output of the fold model that scored it (red: regions that raise the melanoma score), with its "
                "metadata (sex, age, site) and its score."),
             _p(f"The maps are taken at {' / '.join(layers)} and scaled up to the image; they explain the plain view "
                "of the image, while the score is the mean over the run's TTA views. The maps were computed "
                f"in {' / '.join(used)}: each model's own precision and layout, as its out-of-fold scores were.")]
    if "other_malignant" in chosen:
        parts.append(_p("Lesions whose diagnosis is malignant or premalignant but not melanoma (e.g. basal cell "
                        "carcinoma) count as 0 for the melanoma target; they have their own gallery, apart from the "
                        "benign lesions, since a high score on them is not a false alarm."))
    for name, (title, rows) in chosen.items():
        imgs, maps, note = _cams(models, rows, device, precision)
        titles = [f"{r.image_name}\n{r.diagnosis} · {r.pred:.3f}\n{_describe(r._asdict())}" for r in rows.itertuples()]
        counts = rows["diagnosis"].value_counts(sort=False)
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(_p("By diagnosis: " + ", ".join(f"{d} {c}" for d, c in counts.items()) + "."))
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append(_img(plot_cam_grid(imgs, maps, titles, figdir / f"{name}.png", title=title)))
    return "\n".join(parts)


def _fold_models(run: RunFolder) -> dict:
    from ..inference import load_predictor

    models = {}
    for d in run.model_dirs():
        p = load_predictor(d)
        models[int((p.spec.fold if p.spec.fold is not None else len(models)))] = p
    return models


def _cams(models, rows, device, precision=None) -> tuple[list, list, str]:
    "Images (uint8, as the model saw them) and Grad-CAM maps of `rows`, each by its own fold's model."
    from ..errors import MelafastError
    from .explain import grad_cam
    from ..inference import model_batch

    imgs, maps, note = [None] * len(rows), [None] * len(rows), ""
    for k, part in rows.reset_index(drop=True).groupby("fold"):
        p = models[int(k)]
        s, img, meta = model_batch(p, part, device, precision)
        try:
            with s.autocast():
                cams = grad_cam(p.model, img, meta, p.spec.pos)
        except MelafastError as e:
            cams, note = np.zeros(img.shape[:1] + img.shape[2:]), f"no Grad-CAM: {e}"
        pixels = (img.permute(0, 2, 3, 1).clamp(0, 1) * 255).byte().cpu().numpy()
        for j, i in enumerate(part.index):
            imgs[i], maps[i] = pixels[j], cams[j]
    return imgs, maps, note


def _metadata(config, models, df, figdir, repeats, bs, num_workers, device, precision=None) -> str:
    from .explain import metadata_importance
    from .plots import plot_importance

    if not config.settings.meta:
        return _p("This run uses the image only (--no-meta): there is no metadata to weigh.")
    table = metadata_importance(models, df, n_repeats=repeats, bs=bs, num_workers=num_workers, device=device,
                                precision=precision)
    text = _p(f"Permutation importance: each column's values shuffled among the out-of-fold images of each fold "
              f"({repeats} times), the images left as they are; the AUC drop says how much the model relies on it. "
              "'all metadata' shuffles every column together, which leaves the model the image alone: the AUC in that "
              "row is the image's own contribution. Plain view, no TTA.")
    return "\n".join([_img(plot_importance(table, figdir / "metadata_importance.png")), text, _table(table)])


def _training(run: RunFolder) -> str:
    parts = []
    if run.curves_file.is_file():  # (the OOF ROC is in "Curves and operating points", with the operating points)
        parts += [f"<h3>{html.escape('losses and validation AUC per epoch and fold')}</h3>", _img(run.curves_file)]
    for f in run.lr_find_files():
        parts += [f"<h3>lr_find, {html.escape(f.parent.name)}</h3>", _img(f)]
    metrics = run.metrics()
    if metrics is not None:
        parts += [f"<h3>{html.escape(run.metrics_file.name)}</h3>", _table(metrics)]
    return "\n".join(parts) or _p("The run folder holds no training plots.")


def run_report(run, data=None, out=None, images=None, n_errors: int = 8, importance: bool = True,
               n_boot: int = 1000, repeats: int = 5, bs: int = 64, num_workers: int | None = None, device=None,
               log: Callable = print, precision: str | None = None, operating_point: str | None = None,
               prevalence: float | None = None, audit: bool = True) -> Path:
    """Write `out` (default the run's report.html): a self-contained HTML page (figures embedded, no network needed),
    and its figures as PNGs in `<out stem>_figures/`. `data` defaults to the run's data folder; `n_errors` images
    per error grid (0: none); `importance=False` skips the metadata importance (one pass over the OOF images).
    The model passes (Grad-CAM, importance) run each model in the precision it was validated with, or `precision`.
    `operating_point` (sens90, spec95, ..., or a threshold; see `operating.parse_goal`) is chosen on the out-of-fold
    predictions and saved in the run's threshold.json, from which `predict` adds a decision; `prevalence` adds the
    predictive values at that share of melanomas. `audit=False` leaves out the shortcut audit (see `audit`: one
    plain-view pass over the out-of-fold images per artefact).
    """
    from ..atomic import write_text
    from .operating import prevalences, parse_goal

    if operating_point is not None:
        parse_goal(operating_point)  # a bad one stops before any work
    prevalences([0, 1], prevalence)
    folder = RunFolder(run)
    config, oof = _read_run(folder)
    results = folder.figures()
    df, data = _oof_with_metadata(folder, config, oof, data, images)
    out = Path(out) if out is not None else folder.report_file
    figdir = out.parent / f"{out.stem}_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    log(f"report on {run}: {len(df)} out-of-fold images from {data}")
    sections = {"summary": _summary(config, results, df, data, n_boot)}
    sections["curves"], table = _curves(df, figdir, n_boot, operating_point, prevalence)
    if operating_point is not None:
        from .operating import save_operating_point

        point = save_operating_point(folder, operating_point, prevalence, n_boot, table=table)
        log(f"saved operating point {point.operating_point} (threshold {point.threshold:.4f}) to "
            f"{folder.operating_point_file}: `melafast predict` adds a decision column from it")
        sections["curves"] += _saved_point(point)
    sections["calibration"] = _calibration(config, df, figdir)
    sections["subgroups"] = _subgroups(config, df, figdir, n_boot)
    models = _fold_models(folder) if n_errors > 0 or importance or audit else {}
    sections["errors"] = (_errors(models, df, figdir, n_errors, bs, num_workers, device, precision) if n_errors > 0
                          else _p("Left out (n_errors=0)."))
    if audit:
        from .audit import audit_section

        from ..atomic import write_csv

        sections["shortcuts"], audit_table = audit_section(folder, config, models, df, figdir, n_boot=n_boot, bs=bs,
                                                           num_workers=num_workers, device=device,
                                                           precision=precision, log=log)
        write_csv(audit_table, figdir / "audit.csv")
    else:
        sections["shortcuts"] = _p("Left out (--no-audit).")
    sections["metadata"] = (_metadata(config, models, df, figdir, repeats, bs, num_workers, device, precision)
                            if importance else _p("Left out (--no-importance)."))
    sections["training"] = _training(folder)
    write_text(_page(f"melafast report: {Path(run).name}", sections, SECTIONS), out)
    log(f"wrote {out} and its figures in {figdir}")
    return out
