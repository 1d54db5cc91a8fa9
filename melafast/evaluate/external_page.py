"""The page of `melafast evaluate`: an external evaluation beside the run's own out-of-fold figures (the same
`Evaluation` computes both), with the metadata's effect there, calibration, subgroups, the saved operating point
on these patients, and the worst errors with their Grad-CAM maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.signatures import SKIN_TONE_NOTE
from .figures import Evaluation
from .pages import figure, image, interval, note, page, para, table

__all__ = ["evaluation_page", "SECTIONS"]

SECTIONS = {"summary": "Summary", "metadata": "With and without metadata", "curves": "ROC",
            "calibration": "Calibration", "subgroups": "Subgroups", "operating": "The saved operating point here",
            "errors": "Worst errors", "method": "How it was computed"}


def _side_by_side(home: Evaluation, ev: Evaluation) -> pd.DataFrame:
    here = ev.headline.set_index("key")
    rows = []
    for r in home.headline.itertuples():
        h = here.loc[r.key]
        d = int(r.digits)
        diff = r.value - h["value"]
        rows.append({"figure": r.figure, "the run's out-of-fold (training clinic)": figure(r.value, d),
                     "its interval": interval(r.lo, r.hi, d), "this set": figure(h["value"], d),
                     "this set's interval": interval(h["lo"], h["hi"], d),
                     "out-of-fold minus this set": "n/a" if np.isnan(diff) else f"{diff:+.{d}f}"})
    return pd.DataFrame(rows)


def _summary(result, ev, home) -> str:
    gap = result["gap"]["auc"]
    auc_here = ev.headline.set_index("key").loc["auc"]
    out = [para(f"{result['source']}: {ev.n_images} images, {ev.n_melanomas} melanomas"
                + (f", {ev.n_patients} patients" if ev.n_patients is not None else "")
                + f"; scored by the {result['models']} fold models of {result['run']} as predict scores them (their "
                f"mean, TTA x{result['tta']}, with the metadata the table gives)."),
           table(_side_by_side(home, ev))]
    if auc_here["hi"] < home.value("auc"):
        out.append(note(f"The run's out-of-fold AUC ({home.value('auc'):.4f}) lies above this set's whole interval "
                        f"({interval(auc_here['lo'], auc_here['hi'])}): the CV overstates these patients by "
                        f"{gap:.3f} AUC. Figures measured in the training clinic do not carry over here."))
    if result["left_out"]:
        out.append(note(f"{len(result['left_out'])} images were in the run's training data and are left out of every "
                        "figure (listed in evaluation.json)."))
    low = result["below_whole"]
    if low:
        out.append(note("Served worse here: " + "; ".join(f"{r['variable']} {r['group']} (AUC {r['auc']:.3f}, "
                                                          f"{r['lo']:.3f} to {r['hi']:.3f}, {r['images']} images)"
                                                          for r in low)
                        + f": each interval lies below this set's AUC ({ev.value('auc'):.3f}). See Subgroups."))
    return "\n".join(out)


def _metadata(result, ev, blank) -> str:
    if blank is None:
        return para("This run uses the image only (--no-meta): there is no metadata path to compare.")
    d = pd.DataFrame(result["metadata_effect"]).set_index("key").loc["auc"]
    text = [para("The same images scored twice in one pass: with the metadata the table gives (predict's answer) and "
                 "with every patient field blanked (the path a patient who comes with images only takes). The "
                 f"difference is paired (the same patients resampled for both, {ev.n_boot} resamples)."),
            table(pd.DataFrame([dict(path="with metadata", auc=ev.value("auc")),
                                dict(path="every field blanked (image path)", auc=blank.value("auc")),
                                dict(path="metadata adds", auc=d["diff"])])),
            para(f"Metadata adds {d['diff']:+.4f} AUC here ({interval(d['lo'], d['hi'])}).")]
    if d["hi"] < 0:
        text.append(note("On these patients the metadata costs AUC: the age, sex and site priors the run learnt in "
                         "its training clinic mislead here. Until the run is retrained with this clinic's data, score "
                         "its images without metadata (predict without --meta; serve and the API with the fields "
                         "left empty): that is the image path above."))
    return "\n".join(text)


def _operating(result) -> str:
    t = result["operating_point"]
    if t is None:
        return para("The run has no saved operating point (`melafast operating-point` or `calibrate` saves one).")

    def cell(fig):
        return "" if fig is None else f"{fig['value']:.3f} ({interval(fig['lo'], fig['hi'], 3)})"

    promised, here = t["promised"], t["here"]
    rows = [dict(measure=m, **{"where it was chosen (cross-fitted)": cell(promised.get(m)), "here": cell(here.get(m))})
            for m in ("sensitivity", "specificity")]
    for p in here.get("predictive", []):
        rows += [dict(measure=f"{m} at {p['prevalence']:.1%}", **{"where it was chosen (cross-fitted)": "",
                                                                  "here": cell(p.get(m))}) for m in ("PPV", "NPV")]
    text = [para(f"The run's saved point {t['operating_point']} ({t['goal']}): threshold {t['threshold']:.4f}, "
                 f"chosen on {t['chosen_on']}. Decision rule: {t['rule']}. Applied unchanged to these images, it "
                 f"calls {t['called_melanoma']} of {result['external']['images']} melanoma."), table(pd.DataFrame(rows))]
    if t.get("by_diagnosis"):
        text += [para("Who it calls melanoma here, by diagnosis (on a benign diagnosis the share called melanoma is "
                      "1 - its specificity):"), table(pd.DataFrame(t["by_diagnosis"]), 3)]
    worse = [m for m in ("sensitivity", "specificity") if here.get(m) is not None and promised.get(m) is not None
             and here[m]["hi"] < promised[m]["value"]]
    if worse:
        text.append(note(f"Its {' and '.join(worse)} here lie{'s' if len(worse) == 1 else ''} below what it reached "
                         "where it was chosen: the threshold does not transfer. Choose one for this clinic on its own "
                         "patients (`melafast calibrate`)."))
    return "\n".join(text)


def evaluation_page(folder, result, ev, blank, home, rows, columns, out: Path, n_errors=8, bs=64, num_workers=None,
                    device=None, precision=None) -> str:
    "The page's HTML; its figures are written in `out`/figures."
    from .gallery import error_section
    from .plots import plot_reliability, plot_roc_overlay, plot_subgroups
    from .runview import fold_models

    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    curves = {"with metadata (predict)": rows["pred"]}
    if blank is not None:
        curves["every field blanked"] = rows["pred_no_meta"]
    cal = ev.calibration
    groups = ev.subgroups(columns)
    sections = {
        "summary": _summary(result, ev, home),
        "metadata": _metadata(result, ev, blank),
        "curves": image(plot_roc_overlay(rows["target"], curves, figdir / "roc.png")),
        "calibration": "\n".join([image(plot_reliability(cal["bins"], cal["ece"], cal["brier"], figdir / "calibration.png")),
                                  para(f"Expected calibration error {cal['ece']:.4f} here, "
                                       f"{home.calibration['ece']:.4f} on the run's out-of-fold images; Brier score "
                                       f"{cal['brier']:.4f}. Probabilities carry the training data's share of "
                                       f"melanomas; this set's is {ev.n_melanomas / ev.n_images:.1%}."),
                                  table(cal["bins"])]),
        "subgroups": "\n".join([image(plot_subgroups(groups, dict(auc=ev.value("auc")), figdir / "subgroups.png")),
                                para("AUC per group with a 95% interval (whole patients resampled); groups with fewer "
                                     "than 5 melanomas get no AUC. Variables: " + ", ".join(columns) + "."),
                                *([note(SKIN_TONE_NOTE)] if "skin_tone" in columns.values() else []),
                                table(groups)]),
        "operating": _operating(result),
    }
    if n_errors > 0:
        models = fold_models(folder)
        first = min(models)
        sections["errors"] = error_section(models, rows.assign(fold=first), figdir, n_errors, bs, num_workers, device,
                                           precision, scored_by=f"fold model {first} (the score shown is the mean of "
                                           f"all {len(models)})")
    else:
        sections["errors"] = para("Left out (--errors 0).")
    sections["method"] = para(
        f"Every figure comes from evaluation.json and scores.csv beside this page. Intervals: {ev.n_boot} bootstrap "
        f"resamples of whole {'patients' if ev.n_patients is not None else 'images'}, the same resampling as the "
        "run's report, so this page and the report can be read side by side. Images whose name or patient appears in "
        "the run's training data are left out.")
    return page(f"melafast evaluate: {Path(result['run']).name} on {result['name']}",
                sections, SECTIONS)
