"""Metadata features beyond the table's own columns: the patient-relative features (`--patient-features`), and the
2020 winners' extras (`--extra-meta`: images per patient, log file size), with the check that a file-size feature
is read off files prepared as the training images were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .store import file_size, open_image

__all__ = ["EXTRA_CONT_NAMES", "FILE_FEATURES", "PATIENT_SUFFIXES", "add_patient_features", "patient_feature_names",
           "add_meta_features", "file_reference", "check_file_features"]

EXTRA_CONT_NAMES = ("n_images", "log_file_size")  # optional features of the 2020 winners, see add_meta_features
FILE_FEATURES = ("log_file_size",)  # read off the image file, never missing: not a patient field, never blanked
PATIENT_SUFFIXES = ("_patient_z", "_patient_rank")  # the patient-relative features of a column (--patient-features)


def patient_feature_names(columns) -> list:
    "The patient-relative feature names of `columns`, in order."
    return [f"{c}{s}" for c in columns for s in PATIENT_SUFFIXES]


def add_patient_features(df: pd.DataFrame, columns) -> pd.DataFrame:
    """Each numeric column of `columns` compared with the same patient's other lesions ("ugly duckling" features):
    `<col>_patient_z`, its z-score within the patient, and `<col>_patient_rank`, its rank among them from 0 (the
    smallest) to 1 (0.5 for a patient's only lesion, or a row without a patient_id). Computed over the rows of `df`
    only, with no labels: train and test tables each over themselves. A missing value stays missing."""
    df = df.copy()
    who = df["patient_id"] if "patient_id" in df.columns else pd.Series(np.nan, index=df.index)
    alone = who.isna()
    groups = who.astype(object).where(~alone, pd.Series([f"__row{i}" for i in range(len(df))], index=df.index))
    for c in columns:
        x = pd.to_numeric(df[c], errors="coerce")
        g = x.groupby(groups)
        mean, sd, n = g.transform("mean"), g.transform("std", ddof=0), g.transform("count")
        df[f"{c}_patient_z"] = ((x - mean) / sd.where(sd > 1e-12)).where(n > 1, 0.0).fillna(0.0).where(x.notna())
        rank = (g.rank(method="average") - 1) / (n - 1).where(n > 1)
        df[f"{c}_patient_rank"] = rank.fillna(0.5).where(x.notna())
    return df


def add_meta_features(df: pd.DataFrame) -> pd.DataFrame:
    """Add the winners' extra metadata: `n_images` (images of the same patient in this table; missing for an image
    without a patient id, and for every image of a table without the column) and `log_file_size` (log of the image
    file's bytes, which tracks the camera and resolution).

    Compute them on each table separately (train, test) and on the same image copies you will predict on.
    """
    out = df.copy()
    if "patient_id" in out.columns and out["patient_id"].notna().any():
        counts = out.groupby("patient_id")["image_name"].transform("size")
        out["n_images"] = counts.where(out["patient_id"].notna(), np.nan).astype(float)
    else:
        out["n_images"] = np.nan  # unknown, not 1: the model takes its missing-value path
    out["log_file_size"] = np.log1p([file_size(f) for f in out["fname"]])
    return out


def _prepared_size(fname: str) -> int | None:
    "The --size of the `melafast prepare` copy an image belongs to (its prepare.json, up to 3 folders up), if any."
    from .prepare import RECORD

    for parent in list(Path(fname).parents)[:3]:
        record = parent / RECORD
        if record.is_file():
            try:
                return int(json.loads(record.read_text())["size"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def _sample(fnames, n: int = 200) -> list:
    fnames = list(fnames)
    return [fnames[i] for i in np.linspace(0, len(fnames) - 1, min(n, len(fnames))).astype(int)] if fnames else []


def _median_side(fnames) -> float:
    from PIL import Image

    sides = []
    for f in fnames:
        with Image.open(open_image(f)) as im:
            sides.append(min(im.size))
    return float(np.median(sides))


def file_reference(df: pd.DataFrame) -> dict:
    """What the file features of a training table were computed on: the images' median shorter side (from up to
    200 headers), the median log file size, and the `melafast prepare` size when the images are such a copy."""
    sample = _sample(df["fname"])
    return dict(median_side=_median_side(sample), median_log_size=float(np.median(np.log1p([file_size(f)
                for f in sample]))), prepared_size=_prepared_size(sample[0]) if sample else None)


def check_file_features(spec, df: pd.DataFrame):
    """Stop with a clear error when the images of `df` are clearly of another kind than those a model's file
    features (`log_file_size`) were trained on (its `ModelSpec`): another resolution, or file sizes far off the
    training ones."""
    ref, proc = spec.files, spec.meta_processor
    if not ref or proc is None or "log_file_size" not in proc.cont_names or df.empty:
        return
    sample = _sample(df["fname"])
    side = _median_side(sample)
    z = (float(np.median(np.log1p([file_size(f) for f in sample]))) - proc.means["log_file_size"]) / \
        proc.stds["log_file_size"]
    other_size = not 0.8 <= side / ref["median_side"] <= 1.25
    other_files = len(sample) >= 10 and abs(z) > 3
    if not (other_size or other_files):
        return
    made = f"; made by `melafast prepare --size {ref['prepared_size']}`" if ref.get("prepared_size") else ""
    fix = (f"melafast prepare --src FOLDER --size {ref['prepared_size']} --out COPY" if ref.get("prepared_size")
           else f"resize them as the training images were (shorter side about {ref['median_side']:.0f} px)")
    raise DataError(f"this model was trained with --extra-meta on images of about {ref['median_side']:.0f} px "
                    f"(shorter side{made}), and its log_file_size feature depends on how the files were made; the "
                    f"images to predict are about {side:.0f} px, their file sizes {z:+.1f} training standard "
                    f"deviations off. Predict copies made the same way ({fix}), or use a run trained without "
                    "--extra-meta")
