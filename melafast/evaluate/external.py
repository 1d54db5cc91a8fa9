"""`melafast evaluate`: a run scored on labelled images from elsewhere (another clinic, camera, population), as
`predict` scores them, with the figures computed by the one `Evaluation` and set beside the run's own out-of-fold
figures: how far the in-clinic CV overstates the new clinic is the number to know before trusting any other."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, MelafastError
from .figures import SUBGROUPS, Evaluation

__all__ = ["evaluate_run", "read_labelled", "trained_on", "score_rows", "evaluation_in_words", "external_evaluations", "EXTRA_GROUPS", "SCORES"]

# columns that, where an external set has them, are subgroups too: the institution, how the label was confirmed
EXTRA_GROUPS = {"institution": "attribution", "label confirmed by": "dx_type"}
SCORES = "scores.csv"  # per image: target, pred (predict's answer), pred_no_meta, each fold model's pred


def read_labelled(data=None, images=None, labels=None) -> tuple[pd.DataFrame, str]:
    """(rows with `image_name`, `fname`, `target` and any metadata, where they come from): a dataset folder's
    train.csv (`data`, any layout melafast reads; `images` where its images are), or a folder of images with a
    labels CSV (`images` and `labels`: image_name, target and any metadata). One `DataError` line when it has no
    labels, no melanoma or no benign lesion."""
    from ..data import image_table, load_split, read_table
    from ..layout import split_csv

    if data is not None:
        csv = split_csv(data, "train")
        if not csv.is_file():
            raise DataError(f"{data} has no train.csv (nor train-metadata.csv): evaluate needs labelled images")
        if "target" not in pd.read_csv(csv, nrows=0).columns:
            raise DataError(f"{csv} has no labels (a target column: 1 melanoma, 0 not): an evaluation needs them")
        table, source = load_split(data, "train", images=images), str(data)
    elif images is not None and labels is not None:
        known = read_table(labels, required=("image_name",))
        table = image_table(images, known)
        missing = set(known["image_name"]) - set(table["image_name"])
        if missing:
            raise DataError(f"{len(missing)} images of {labels} are not in {images} (e.g. {sorted(missing)[0]})")
        table = table[table["image_name"].isin(known["image_name"])].reset_index(drop=True)
        source = f"{images} with labels {labels}"
    else:
        raise MelafastError("evaluate needs labelled images: --data FOLDER (a train.csv), or --images DIR --labels CSV")
    if "target" not in table.columns or table["target"].isna().all():
        raise DataError(f"{source} has no labels (a target column: 1 melanoma, 0 not): an evaluation needs them")
    table = table.dropna(subset=["target"]).reset_index(drop=True)
    n_mel = int(table["target"].astype(int).sum())
    if n_mel == 0 or n_mel == len(table):
        raise DataError(f"{source} holds {n_mel} melanomas in {len(table)} images: an AUC needs melanomas and "
                        "benign lesions")
    return table.assign(target=table["target"].astype(int)), source


def trained_on(folder, table: pd.DataFrame, log: Callable = print) -> pd.DataFrame:
    """The rows of `table` the run trained on, with why: the same image name, a patient of its training table, or
    an image whose pixels nearly duplicate a training image's (perceptual hash within the run's --dedup distance, or
    `DUP_DISTANCE`), found by content whatever its name. (image_name, reason, by_pixels: found by content alone);
    empty when none."""
    from ..config import DUP_DISTANCE
    from ..data import load_split
    from ..data.signatures import cross_duplicates, with_signatures
    from .operating import oof_patients

    oof = folder.oof(need="an evaluation is checked against the images the run trained on")
    settings = folder.train_config() if folder.config_file.is_file() else None
    reasons = pd.Series("", index=table.index, dtype=object)
    reasons[table["image_name"].isin(set(oof["image_name"]))] = "the same image name as a training image"
    known = oof_patients(folder, oof)
    if known is not None and "patient_id" in table.columns:
        same = table["patient_id"].isin(set(known.dropna())) & (reasons == "")
        reasons[same] = "a patient of the run's training table"
    try:
        train = load_split(folder.data_for(None), "train")
        train = train[train["image_name"].isin(set(oof["image_name"]))]
        for ext in settings.external if settings is not None else []:
            more = load_split(ext, "train")  # --external rows trained every fold
            reasons[(reasons == "") & table["image_name"].isin(set(more["image_name"]))] = \
                "the same image name as an external training image"
            train = pd.concat([train, more], ignore_index=True)
    except MelafastError:
        train = None
    by_pixels = pd.Series(False, index=table.index)
    if train is None or "fname" not in table.columns:
        log("the run's training images could not be read (its data folder is not here): images are checked against "
            "its image names and patients only, not by content")
    else:
        distance = settings.dedup if settings is not None and settings.dedup >= 0 else DUP_DISTANCE
        copies = cross_duplicates(with_signatures(table.reset_index(drop=True), progress=False),
                                  with_signatures(train.reset_index(drop=True), progress=False), distance)
        copy_of = dict(zip(copies["image_name"], zip(copies["duplicate_of"], copies["distance"])))
        by_pixels = (reasons == "") & table["image_name"].isin(copy_of)
        for i in table.index[by_pixels]:
            other, bits = copy_of[table.at[i, "image_name"]]
            reasons[i] = f"a near-duplicate of training image {other} ({bits} bits apart)"
    hit = reasons != ""
    return pd.DataFrame({"image_name": table.loc[hit, "image_name"].to_numpy(), "reason": reasons[hit].to_numpy(),
                         "by_pixels": by_pixels[hit].to_numpy()})


def _subgroup_columns(rows: pd.DataFrame, group_by) -> dict:
    "The subgroup variables of an evaluation: sex, age, site, and institution, label source, `group_by`."
    missing = [c for c in group_by or () if c not in rows.columns]
    if missing:
        raise DataError(f"--group-by {missing[0]}: the labelled table has no such column")
    columns = {n: c for n, c in SUBGROUPS.items() if c in rows.columns}
    columns.update({n: c for n, c in EXTRA_GROUPS.items() if c in rows.columns and rows[c].nunique() > 1})
    columns.update({c: c for c in group_by or ()})
    return columns


def _clean(v):
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def evaluate_run(run, data=None, images=None, labels=None, out=None, name: str | None = None, group_by=(),
                 n_boot: int = 1000, n_errors: int = 8, tta: int | None = None, bs: int = 64,
                 num_workers: int | None = None, device=None, precision: str | None = None, progress: bool = True,
                 log: Callable = print, scores: pd.DataFrame | None = None) -> Path:
    """Score labelled images the run never trained on and write `<out>/evaluation.html`, `evaluation.json` and
    `scores.csv` (default `out`: `<run>/evaluations/<name>`, `name` the data folder's name). Images the run trained on
    (see `trained_on`) are left out and listed. `scores`: a scores.csv already made for these rows (skips scoring)."""
    from ..atomic import write_csv, write_json, write_text
    from ..data.signatures import add_skin_tone
    from ..runfolder import RunFolder
    from .external_page import evaluation_page
    from .runview import oof_with_metadata, read_run

    folder = RunFolder(run)
    config, oof = read_run(folder, "an evaluation")
    table, source = read_labelled(data, images, labels)
    name = name or Path(str(data if data is not None else labels)).stem
    out = Path(out) if out is not None else folder.path / "evaluations" / name
    seen = trained_on(folder, table, log)
    if len(seen):
        log(f"warning: {len(seen)} of {len(table)} images were in the run's training data ("
            + "; ".join(f"{kind}: {n}" for kind, n in seen["reason"].where(
                ~seen["by_pixels"], "a near-duplicate of a training image").value_counts().items())
            + f"; e.g. {seen['image_name'].iloc[0]}): left out of every figure, listed in evaluation.json")
        table = table[~table["image_name"].isin(seen["image_name"])].reset_index(drop=True)
        if table["target"].nunique() < 2:
            raise DataError(f"without the images the run trained on, {source} has no melanoma or no benign lesion left")
    if scores is None:
        scores = score_rows(folder, table, tta, bs, num_workers, device, precision, progress, log)
    rows = add_skin_tone(table.merge(scores.drop(columns=["target"], errors="ignore"), on="image_name", how="left"),
                         progress=False)
    ev = Evaluation(rows, n_boot=n_boot)
    blank = Evaluation(rows, score="pred_no_meta", n_boot=n_boot) if rows["pred_no_meta"].notna().all() else None
    try:
        own, _ = oof_with_metadata(folder, config, oof, None, None)
    except DataError:  # the run's data folder is elsewhere: the bare out-of-fold rows still give the headline
        own = oof
    home = Evaluation(own, n_boot=n_boot)
    columns = _subgroup_columns(rows, group_by)
    point = folder.operating_point()
    transfer = _transfer(folder, point, rows, n_boot) if point is not None else None
    out.mkdir(parents=True, exist_ok=True)
    write_csv(scores, out / SCORES)
    result = dict(
        run=str(folder.path), source=source, name=name, created=datetime.datetime.now().isoformat(timespec="seconds"),
        tta=int(scores.attrs.get("tta", tta or folder.tta)), models=len(folder.model_dirs()),
        left_out=seen[["image_name", "reason"]].to_dict("records"), external=ev.to_dict(), oof=home.to_dict(),
        gap={r.key: _clean(home.value(r.key) - r.value) for r in ev.headline.itertuples()},
        no_meta=blank.to_dict() if blank is not None else None,
        metadata_effect=None if blank is None else [{k: _clean(v) for k, v in r.items()}
                                                    for r in blank.paired(ev).to_dict("records")],
        subgroups=[{k: _clean(v) for k, v in r.items()} for r in ev.subgroups(columns).to_dict("records")],
        below_whole=[{k: _clean(v) for k, v in r.items()} for r in ev.below_whole(columns).to_dict("records")],
        operating_point=transfer)
    write_json(result, out / "evaluation.json")
    write_text(evaluation_page(folder, result, ev, blank, home, rows, columns, out, n_errors=n_errors, bs=bs,
                               num_workers=num_workers, device=device, precision=precision), out / "evaluation.html")
    h = result["external"]["headline"]["auc"]
    log(f"{name}: AUC {h['value']:.4f} ({h['lo']:.4f} to {h['hi']:.4f}) on {ev.n_images} images, {ev.n_melanomas} "
        f"melanomas; the run's out-of-fold AUC {home.value('auc'):.4f} (gap {result['gap']['auc']:+.4f})"
        + ("" if blank is None else f"; without metadata {blank.value('auc'):.4f}"))
    log(f"wrote {out / 'evaluation.html'}, {out / 'evaluation.json'} and {out / SCORES}")
    return out


def score_rows(folder, table, tta, bs, num_workers, device, precision, progress, log) -> pd.DataFrame:
    "Every fold model's scores of `table`, as predict makes them, with metadata and with every field blanked."
    from ..inference import load_predictor
    from ..inference.loop import predict_many

    predictor = load_predictor(folder.path)
    tta = tta or predictor.tta
    log(f"scoring {len(table)} images with the {len(predictor.predictors)} fold models of {folder.path}, TTA x{tta}, "
        "with their metadata and with every field blanked (the same pass)")
    per_model, blank = predict_many(predictor.predictors, table, tta=tta, bs=bs, num_workers=num_workers, device=device,
                                    progress=progress, precision=precision, blank=True)
    per_model = np.asarray(per_model, dtype=np.float64)
    out = pd.DataFrame({"image_name": table["image_name"].to_numpy(), "target": table["target"].to_numpy(),
                        "pred": per_model.mean(axis=0)})
    out["pred_no_meta"] = (np.mean(np.asarray(blank, dtype=np.float64), axis=0)
                           if all(b is not None for b in blank) else np.nan)
    for k, p in enumerate(per_model):
        out[f"pred_model{k}"] = p
    out.attrs["tta"] = tta
    return out


def _transfer(folder, point, rows, n_boot) -> dict:
    """Does the saved operating point hold here: its decisions on these rows (predict's rule) against the figures it
    was saved with."""
    from .operating import decide, decision_figures

    per_model = rows[[c for c in rows.columns if c.startswith("pred_model")]].to_numpy().T
    decision, _ = decide(point, list(per_model))
    groups = rows["patient_id"] if "patient_id" in rows.columns else None
    here = decision_figures(rows["target"].to_numpy(), decision, groups, n_boot=n_boot)
    by_diagnosis = None
    if "diagnosis" in rows.columns:  # which diagnoses it calls melanoma here (1 - specificity on a benign one)
        from ..metrics import calls_by_diagnosis_table

        by_diagnosis = [{k: _clean(v) for k, v in r.items()}
                        for r in calls_by_diagnosis_table(rows, decision).to_dict("records")]
    return dict(operating_point=point.operating_point, goal=point.goal, threshold=point.threshold,
                chosen_on=point.chosen_on, rule=point.rule, promised=point.crossfit, here=here,
                called_melanoma=int(decision.sum()), by_diagnosis=by_diagnosis)


def evaluation_in_words(e: dict) -> str:
    """One sentence of an external evaluation (an evaluation.json): where, how many, its AUC beside the run's own,
    without metadata, and what to do when the metadata measurably costs AUC there."""
    h, blank = e["external"]["headline"]["auc"], (e.get("no_meta") or {}).get("headline", {}).get("auc")
    text = (f"{e['name']} ({e['source']}; {e['external']['images']} images, {e['external']['melanomas']} melanomas): "
            f"ROC AUC {h['value']:.4f} ({h['lo']:.4f} to {h['hi']:.4f}); the run's out-of-fold AUC minus this "
            f"{e['gap']['auc']:+.4f}" + (f"; without metadata {blank['value']:.4f}" if blank else "") + ".")
    effect = {r["key"]: r for r in e.get("metadata_effect") or []}.get("auc")
    if effect is not None and effect["hi"] is not None and effect["hi"] < 0:
        text += (f" The metadata costs AUC there ({effect['diff']:+.4f}, {effect['lo']:+.4f} to {effect['hi']:+.4f}): "
                 "score that clinic's images without metadata (the image path) until the run is retrained with its "
                 "data.")
    return text


def external_evaluations(folder) -> list[dict]:
    "Every `melafast evaluate` of the run (evaluation.json under <run>/evaluations/), newest first."
    found = []
    for f in sorted((Path(folder.path) / "evaluations").glob("*/evaluation.json")):
        try:
            found.append(json.loads(f.read_text()) | {"folder": str(f.parent)})
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda d: d.get("created", ""), reverse=True)
