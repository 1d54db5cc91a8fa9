"""`melafast card`: a model card (Hugging Face's format: a YAML header, then Markdown) written from a run folder.

Every figure comes from the run: its settings and versions (config.json), its honest out-of-fold predictions
(oof.csv, with the same patient bootstrap as the report), its data folder (who the data holds), its saved operating
point (threshold.json) and its shortcut audit (audit.csv) when they exist. Nothing is typed by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError

__all__ = ["model_card"]

LIMITS = (
    "Research use only. This is not a medical device and has not been evaluated prospectively or in a clinic; it must "
    "not be used to diagnose, to rule out melanoma, or to decide on any patient's care.",
    "Every figure here is a cross-validated estimate on the data described below, from lesions photographed with "
    "the same devices at the same sites; performance on other populations, cameras, dermatoscopes or image "
    "preparation is unknown and can be much lower.",
    "The training data records no skin type. Public dermoscopy collections are dominated by light-skinned patients: "
    "treat performance on darker skin as unknown.",
    "The score is a ranking first: its probabilities are calibrated only as far as the calibration figures below "
    "say, and a threshold must be chosen (and checked) for the population it is used on.",
)


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _md_table(df: pd.DataFrame, digits: int = 4) -> str:
    cells = [[_fmt(v, digits) if isinstance(v, (float, np.floating)) else ("" if v is None else str(v)) for v in row]
             for row in df.itertuples(index=False)]
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    return "\n".join([head, "|" + "---|" * len(df.columns), *("| " + " | ".join(r) + " |" for r in cells)])


def _served_worse(ev, data_note) -> list:
    "A limit for the subgroups whose AUC interval lies below the whole's (none when the metadata could not be read)."
    if data_note:
        return []
    low = ev.below_whole()
    if not len(low):
        return []
    return ["- Served measurably worse in this data (the AUC interval of each lies below the AUC of all images, "
            f"{ev.value('auc'):.3f}): " + "; ".join(f"{r.variable} {r.group}, AUC {r.auc:.3f} ({r.lo:.3f} to {r.hi:.3f}, "
                                                  f"{r.images} images)" for r in low.itertuples()) + "."]


def _command(command: str) -> str:
    "How the run was started: the `melafast train ...` command as typed, when the run was started by one."
    words = str(command or "").split()
    if len(words) > 1 and Path(words[0]).name == "melafast" and words[1] == "train":
        return "`" + " ".join(["melafast", *words[1:]]) + "`"
    return "from Python (`train_run`); every setting is in the run's config.json"


def _header(name, data_name, ev) -> str:
    import yaml

    headline = ev.headline
    header = {
        "library_name": "melafast",
        "pipeline_tag": "image-classification",
        "tags": ["melanoma", "dermoscopy", "dermatology", "medical-imaging", "fastai", "timm", "melafast"],
        "metrics": ["roc_auc"],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "melanoma vs other skin lesions"},
            "dataset": {"name": data_name, "type": "dermoscopy"},
            "metrics": [{"type": "roc_auc" if r.key == "auc" else r.key, "value": round(float(r.value), 4),
                         "name": "out-of-fold " + r.figure + " (patient-grouped cross-validation)"}
                        for r in headline.itertuples() if not np.isnan(r.value)]}]}],
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(run, out=None, data=None, images=None, n_boot: int = 1000, log: Callable = print) -> Path:
    """Write `out` (default <run>/MODEL_CARD.md): the run's model card. `data`/`images` as for `run_report` (default
    the run's data folder; without it the card says so and leaves out the figures that need the metadata)."""
    from ..atomic import write_text
    from ..runfolder import RunFolder
    from .figures import SUBGROUPS, Evaluation
    from .runview import oof_with_metadata, read_run

    folder = RunFolder(run)
    config, oof = read_run(folder, "the model card")
    results, s = folder.figures(), config.settings
    try:
        df, data = oof_with_metadata(folder, config, oof, data, images)
        data_note = ""
    except DataError as e:
        df, data, data_note = oof, config.data, f"The data folder could not be read ({e}): figures by patient " \
                                                        "group are left out."
    name = Path(run).resolve().name
    data_name = Path(str(data)).name if data else "unknown"
    ev = Evaluation(df, n_boot=n_boot)
    cal = ev.calibration
    lines = [_header(name, data_name, ev), f"# {name}: melanoma classifier (melafast)", ""]

    lines += ["## Model", "",
              f"- Architecture: timm `{s.arch}` image backbone"
              + (" with a metadata network (patient fields) fused before the head" if s.meta else
                 ", image only") + f"; {len(folder.model_dirs())} fold model(s), averaged at prediction.",
              f"- Input: {s.size} px dermoscopic images"
              + (f", with {', '.join(sum(config.metadata_columns, []))} when known" if s.meta else "")
              + f"; test-time augmentation: {s.tta} dihedral view(s).",
              f"- Training: {s.freeze_epochs} frozen + {s.epochs} epochs, batch size {s.bs}, "
              f"learning rate {s.lr if s.lr is not None else 'from lr_find per fold'}, "
              f"{s.folds} patient-grouped folds, seed {s.seed}, "
              f"{'ImageNet weights' if s.pretrained or s.weights else 'random initialisation'}, "
              f"metadata dropout {s.meta_dropout}" + (f" ({s.dropout_patterns})" if s.meta_dropout else "")
              + ("; images without any metadata are scored by an image-only head trained on every training image"
                 if s.meta and s.image_head else "") + ".",
              "- Software: " + ", ".join(f"{k} {v}" for k, v in config.versions.items()) + ".",
              f"- Trained with: {_command(config.command)}", ""]

    lines += ["## Intended use and limits", "",
              "A research model that ranks dermoscopic images of skin lesions by their risk of melanoma, for studying "
              "such models and for decision support research under clinical oversight.", "",
              *(f"- {t}" for t in LIMITS), *_served_worse(ev, data_note), ""]

    lines += ["## Training data", "",
              f"`{data_name}`: {config.n_train or len(df)} training images, "
              f"{config.n_melanoma if config.n_melanoma is not None else int(df['target'].sum())} "
              f"melanomas ({df['target'].mean():.1%} of the scored images)"
              + (f", {df['patient_id'].nunique()} patients" if "patient_id" in df.columns else "")
              + (f"; {config.n_external} external images trained but are never scored" if config.n_external
                 else "") + "."]
    if data_note:
        lines += ["", data_note]
    elif set(SUBGROUPS.values()) & set(df.columns):
        sub = ev.subgroups()
        lines += ["", "Who the data holds (out-of-fold images per group, with the AUC and its 95% patient-bootstrap "
                  "interval where a group has at least 5 melanomas):", "",
                  _md_table(sub[["variable", "group", "images", "melanomas", "auc", "lo", "hi"]]), ""]
        few = sub[sub["note"] != ""]
        if len(few):
            lines += ["Under-represented (too few melanomas for an AUC): "
                      + ", ".join(f"{r.variable} {r.group} ({r.melanomas} melanomas in {r.images} images)"
                                  for r in few.itertuples()) + ". The model's performance there is unknown."]
    lines.append("")

    lines += ["## Evaluation (out-of-fold, patient-grouped cross-validation)", "",
              "Each image is scored by the fold model that never trained on any image of its patient.", "",
              *(f"- {r.figure[0].upper() + r.figure[1:]} **{_fmt(r.value, r.digits)}** ({ev.level:.0%} interval "
                f"{_fmt(r.lo, r.digits)} to {_fmt(r.hi, r.digits)}; {r.about})" for r in ev.headline.itertuples()),
              f"  (intervals from {ev.n_boot} bootstrap resamples of whole "
              f"{'patients' if ev.n_patients is not None else 'images'})",
              f"- Calibration: expected calibration error {_fmt(cal['ece'])}, Brier score {_fmt(cal['brier'])}"]
    if results.oof_auc_no_meta is not None:
        lines.append(f"- Without any metadata (every patient field blanked): ROC AUC {_fmt(results.oof_auc_no_meta)}")
    if results.cv_note:
        lines.append(f"- Note: this CV is {results.cv_note}")
    lines += ["", _md_table(ev.per_fold), ""]

    point = folder.operating_point()
    lines += ["## Operating point", ""]
    if point is None:
        lines += ["None saved: the model gives a probability only. Choose one with `melafast report --run RUN "
                  "--operating-point sens90` before using decisions.", ""]
    else:
        cf = point.crossfit
        lines += [f"`{point.operating_point}` ({point.goal}): threshold {_fmt(point.threshold)} on the melanoma "
                  f"probability, chosen on {point.chosen_on}. Decision rule: {point.rule}.", ""]
        if cf.get("sensitivity") is not None:
            rows = [dict(measure=m, prevalence="", value=cf[m]["value"], lo=cf[m]["lo"], hi=cf[m]["hi"])
                    for m in ("sensitivity", "specificity")]
            rows += [dict(measure=m, prevalence=f"{p['prevalence']:.1%}", value=p[m]["value"], lo=p[m]["lo"],
                          hi=p[m]["hi"]) for p in cf["predictive"] for m in ("PPV", "NPV")]
            how = ("on the calibration set (each patient-grouped part of it judged by a threshold chosen on the "
                   "others)" if point.scale == "ensemble" else "(each fold's threshold chosen on the other folds)")
            lines += [f"Cross-fitted {how}, 95% patient-bootstrap intervals:", "", _md_table(pd.DataFrame(rows), 3), ""]
        else:
            lines += ["It could not be cross-fitted (one fold): its in-sample figures are optimistic.", ""]

    table = folder.audit()
    lines += ["## Shortcut audit", ""]
    if table is not None:
        flagged = table.loc[table["flagged"], "artefact"].tolist()
        lines += [("Flagged: " + ", ".join(flagged) + ": the scores depend on these artefacts."
                   if flagged else "No artefact flagged."), "",
                  _md_table(table[["artefact", "benign change", "benign lo", "benign hi", "AUC clean",
                                   "AUC with artefact", "AUC lo", "AUC hi", "flagged"]].rename(
                      columns={"AUC lo": "AUC change lo", "AUC hi": "AUC change hi"}), 3), ""]
    else:
        lines += ["Not run: `melafast audit --run RUN` draws ink, rulers, vignettes, hair and colour patches on the "
                  "out-of-fold images and measures how far the scores move.", ""]

    lines += ["## How to use", "", "```bash",
              f"melafast predict --run {name} --images new_images/ --meta new_images.csv --out preds.csv",
              "```", "", "```python", "from melafast import load_predictor",
              f'predictor = load_predictor("{name}")', 'probs = predictor.predict("new_images/")', "```", ""]
    out = Path(out) if out is not None else folder.path / "MODEL_CARD.md"
    write_text("\n".join(lines), out)
    log(f"wrote {out}")
    return out
