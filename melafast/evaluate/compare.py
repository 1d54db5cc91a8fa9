"""`melafast compare`: is one run better than another, or is the difference noise?

Runs are compared on the out-of-fold images they all scored, with the same patients drawn for every run in each
bootstrap resample (a paired bootstrap), so that what the runs share (the hard patients, the easy ones) cancels out
of the difference. One self-contained HTML page in the report's style, its figures as PNGs, and a printed table.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, MelafastError, RunError
from ..runfolder import RunFolder
from .figures import HEADLINE, SUBGROUPS, Evaluation
from .pages import image, note, page, para, table
from .runview import oof_with_metadata, read_run

__all__ = ["compare_runs"]

SECTIONS = {"summary": "Summary", "metrics": "AUC and partial AUC, paired", "roc": "ROC curves",
            "subgroups": "Subgroups, paired", "settings": "Settings that differ"}


def _labels(runs: list) -> list:
    "Short unique names for the runs: the folder name, or more of its path where two runs share it."
    paths = [Path(r).resolve() for r in runs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{p.name} ({i + 1})" for i, p in enumerate(paths)]  # the same folder given twice


def _shared_rows(labels, loaded) -> tuple[pd.DataFrame, list]:
    "The OOF rows every run scored, as image_name, target, fold (the first run's), pred_<i>, fold_<i>; and notes."
    sets = [set(oof["image_name"]) for _, oof in loaded]
    shared = set.intersection(*sets)
    if not shared:
        raise RunError(f"{labels[0]} and {' and '.join(labels[1:])} share no out-of-fold image: runs can only be "
                       "compared on images they all scored (were they trained on the same data?)")
    df = None
    for i, (_, oof) in enumerate(loaded):
        part = oof.loc[oof["image_name"].isin(shared), ["image_name", "target", "fold", "pred"]]
        part = part.rename(columns={"pred": f"pred_{i}", "fold": f"fold_{i}", "target": f"target_{i}"})
        df = part if df is None else df.merge(part, on="image_name", how="inner")
    notes = []
    for i in range(1, len(loaded)):
        wrong = df[f"target_{i}"] != df["target_0"]
        if wrong.any():
            raise DataError(f"{labels[0]} and {labels[i]} disagree on the label of {int(wrong.sum())} shared images "
                            f"(e.g. {', '.join(df.loc[wrong, 'image_name'].head(3))}): they were not trained on the "
                            "same table")
        moved = int((df[f"fold_{i}"] != df["fold_0"]).sum())
        if moved:
            notes.append(f"The folds differ: {moved} of the {len(df)} shared images sit in another fold in {labels[i]} "
                         f"than in {labels[0]}. Each image is still scored by models that never trained on it, so the "
                         "comparison stays honest, but the runs also differ in which images trained which model.")
    for label, seen in zip(labels, sets):
        if len(seen) != len(shared):
            notes.append(f"{label} scored {len(seen)} out-of-fold images; the comparison uses the {len(shared)} that "
                         "every run scored.")
    df = df.drop(columns=[f"target_{i}" for i in range(1, len(loaded))])
    df = df.rename(columns={"target_0": "target", "fold_0": "fold"})
    return df, notes


def _metrics(labels, df, n_boot) -> tuple[pd.DataFrame, pd.DataFrame]:
    "Per run: every headline measure; per later run: its paired differences from the first (same patients drawn)."
    evs = [Evaluation(df, score=f"pred_{i}", n_boot=n_boot) for i in range(len(labels))]
    scores = pd.DataFrame([dict(run=label, **dict(zip(ev.headline["key"], ev.headline["value"])))
                           for label, ev in zip(labels, evs)])
    diffs = [evs[0].paired(ev).assign(comparison=f"{labels[i]} - {labels[0]}") for i, ev in enumerate(evs) if i]
    diffs = pd.concat(diffs, ignore_index=True) if diffs else pd.DataFrame()
    diffs = diffs.rename(columns={"figure": "metric", "b_better": "share_of_resamples_better"})
    return scores, diffs[["comparison", "metric", "diff", "lo", "hi", "share_of_resamples_better", "resamples"]]


def _subgroups(labels, df, n_boot, min_melanomas: int = 5) -> pd.DataFrame:
    "Each later run's AUC difference from the first per sex, age band and site, with paired intervals."
    from ..metrics import age_band, subgroups

    by = {name: age_band(df[col]) if col == "age_approx" else df[col] for name, col in SUBGROUPS.items() if col in df}
    rows = []
    for name, group, part, why in subgroups(df, by, min_melanomas):
        first = Evaluation(part, "pred_0", n_boot, measures=HEADLINE[:1])  # the AUC
        for i in range(1, len(labels)):
            row = dict(variable=name, group=group, images=len(part), melanomas=int(part["target"].sum()),
                       comparison=f"{labels[i]} - {labels[0]}", auc_a=np.nan, auc_b=np.nan, diff=np.nan, lo=np.nan,
                       hi=np.nan, note=why)
            if not why:
                r = first.paired(Evaluation(part, f"pred_{i}", n_boot, measures=HEADLINE[:1])).iloc[0]
                row.update(auc_a=r["a"], auc_b=r["b"], diff=r["diff"], lo=r["lo"], hi=r["hi"])
            rows.append(row)
    return pd.DataFrame(rows)


def _settings(labels, configs) -> pd.DataFrame:
    "The settings (and library versions) whose values are not the same in every run."
    flat = []
    for config in configs:
        s = {k: v for k, v in asdict(config.settings).items() if k != "out"}
        s.update({f"version of {k}": v for k, v in config.versions.items()})
        flat.append(s)
    keys = sorted(set().union(*flat))
    rows = [dict(setting=k, **{label: str(f.get(k, "(not recorded)")) for label, f in zip(labels, flat)})
            for k in keys]
    return pd.DataFrame([r for r in rows if len({r[label] for label in labels}) > 1], columns=["setting", *labels])


def _printed(labels, df, scores, diffs) -> str:
    keys = [c for c in scores.columns if c != "run"]
    lines = [f"compared on {len(df)} out-of-fold images ({int(df['target'].sum())} melanomas"
             + (f", {df['patient_id'].nunique()} patients" if "patient_id" in df else "") + ") that every run scored",
             f"{'run':<24} " + " ".join(f"{k:>15}" for k in keys)]
    lines += [f"{r['run'][-24:]:<24} " + " ".join(f"{r[k]:>15.4f}" for k in keys) for _, r in scores.iterrows()]
    if len(diffs):
        lines.append(f"\n{'difference':<36} {'metric':<40} {'value':>8}  95% paired bootstrap interval  better in")
        lines += [f"{r.comparison[-36:]:<36} {r.metric[:40]:<40} {r.diff:>+8.4f}  [{r.lo:+.4f}, {r.hi:+.4f}]"
                  f"{'':>12}{r.share_of_resamples_better:>6.0%}" for r in diffs.itertuples()]
    return "\n".join(lines)


def compare_runs(runs, data=None, out=None, images=None, n_boot: int = 1000, log: Callable = print) -> dict:
    """Compare two or more finished runs on the out-of-fold images they all scored: each run's AUC, partial AUC above
    80% TPR and sensitivity at 90% specificity, and each later run's difference from the first with a paired
    patient bootstrap interval; overlaid ROC curves; paired subgroup differences; the settings that differ.

    Writes `out` (default ./compare.html), a self-contained page, and its figures in `<out stem>_figures/`; prints a
    table through `log`. `data` is the dataset folder (default: the first run's), for patients and metadata.
    Returns dict(scores, differences, subgroups, settings, notes, rows, html).
    """
    from ..atomic import write_text
    from .plots import plot_differences, plot_roc_overlay

    if len(runs) < 2:
        raise MelafastError("compare needs at least two run folders")
    if n_boot < 1:
        raise MelafastError("the bootstrap needs at least 1 resample")
    folders = [RunFolder(r) for r in runs]
    loaded = [read_run(f, "the comparison") for f in folders]
    labels = _labels(runs)
    df, notes = _shared_rows(labels, loaded)
    if df["target"].nunique() < 2:
        raise RunError("the images every run scored hold one class only: no AUC to compare")
    df, data = oof_with_metadata(folders[0], loaded[0][0], df, data, images)
    if "patient_id" not in df or df["patient_id"].isna().all():
        notes.append("The data has no patient ids: the bootstrap resamples images, not patients, and its intervals "
                     "are too narrow where one patient has several images.")
        df = df.drop(columns=["patient_id"], errors="ignore")
    out = Path(out) if out is not None else Path("compare.html")
    figdir = out.parent / f"{out.stem}_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    log(f"comparing {', '.join(labels)} on data from {data}")

    scores, diffs = _metrics(labels, df, n_boot)
    subgroups = _subgroups(labels, df, n_boot)
    settings = _settings(labels, [c for c, _ in loaded])
    roc = plot_roc_overlay(df["target"], {label: df[f"pred_{i}"] for i, label in enumerate(labels)}, figdir / "roc.png")
    diff_fig = plot_differences(diffs.assign(label=diffs["comparison"] + ": " + diffs["metric"]),
                                figdir / "differences.png", f"each run minus {labels[0]}, same images and patients")
    sub_ok = subgroups[subgroups["diff"].notna()] if len(subgroups) else subgroups
    prefix = (sub_ok["comparison"] + ": ") if len(labels) > 2 else ""  # with two runs the title says which
    sub_fig = (plot_differences(sub_ok.assign(label=prefix + sub_ok["variable"] + " " + sub_ok["group"]),
                                figdir / "subgroups.png", f"AUC difference per subgroup ({labels[-1]} - {labels[0]})"
                                if len(labels) == 2 else "AUC difference per subgroup") if len(sub_ok) else None)

    resampled = "whole patients" if "patient_id" in df else "images"
    summary = [para(f"Runs: {'; '.join(f'{label} ({Path(r).resolve()})' for label, r in zip(labels, runs))}."),
               para(f"Compared on {len(df)} out-of-fold images, {int(df['target'].sum())} melanomas, that every run "
                  f"scored, from {data}. Each difference is the later run minus {labels[0]}; its 95% interval comes "
                  f"from {n_boot} bootstrap resamples of {resampled}, the same draw for both runs. An interval that "
                  "holds 0 means these images cannot tell the runs apart."),
               *map(note, notes)]
    sections = {"summary": "\n".join(summary),
                "metrics": "\n".join([table(scores), image(diff_fig), table(diffs)]),
                "roc": image(roc),
                "subgroups": "\n".join([*([image(sub_fig)] if sub_fig else []),
                                        para("Groups with fewer than 5 melanomas (or no benign lesion) get no AUC."),
                                        table(subgroups)]) if len(subgroups) else para("The data has no metadata columns."),
                "settings": table(settings) if len(settings) else para("Every recorded setting is the same.")}
    write_text(page("melafast compare: " + " vs ".join(labels), sections, SECTIONS), out)
    log(_printed(labels, df, scores, diffs))
    for n in notes:
        log("note: " + n)
    if len(settings):
        log("settings that differ: " + "; ".join(
            f"{r['setting']}: " + " / ".join(r[label] for label in labels) for _, r in settings.iterrows()))
    log(f"wrote {out}")
    return dict(scores=scores, differences=diffs, subgroups=subgroups, settings=settings, notes=notes, rows=df,
                html=out)
