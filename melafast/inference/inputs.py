"""The one metadata path: what a user gives (a table, a metadata CSV, a form's fields) -> the rows a run's models read.

`predict`, `submit`, `calibrate`, `pseudo`, `serve` and the report all turn their input into model rows here, from the
run's recorded columns and encoding, so the same patient gives the same vector on every surface; the ONNX runtime's
numpy encoder is its twin (tests/test_surfaces.py checks them equal). Whether a row "has no patient metadata" is
decided here by the rule the model routes by (`MetaProcessor.no_metadata`), and `predict`'s message counts with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["clean_table", "model_table", "no_metadata", "form_fields", "upload_refusal", "unseen_values", "unseen_note"]


def _procs(predictors) -> list:
    return [p.meta_proc for p in predictors if p.meta_proc is not None]


def clean_table(df: pd.DataFrame, cat=(), cont=(), relative=(), source=None) -> pd.DataFrame:
    """`df` with its metadata read as training read it: the 2020 columns and the declared `cat`/`cont` columns
    cleaned (a value that cannot be what its column means is one `DataError`), and each `relative` column's
    patient-relative features computed over these rows. What the models read (`model_table`) and what the stack's
    trees read (`melafast stack`) both come through here."""
    from ..data import clean_columns, clean_metadata
    from ..data.features import add_patient_features

    df = clean_columns(clean_metadata(df, source), list(cat), list(cont), source)
    return add_patient_features(df, list(relative)) if relative else df


def model_table(predictors, df: pd.DataFrame) -> pd.DataFrame:
    """The rows of `df` as the models of `predictors` read them: metadata cleaned as training cleaned it (the 2020
    columns and every declared `--cat`/`--cont` column), and the features training computed over its table computed
    over this one (`--extra-meta`: images per patient and log file size; `--patient-features`: each value against
    the same patient's other lesions)."""
    from ..data import EXTRA_CONT_NAMES, add_meta_features, check_file_features
    from ..data.features import PATIENT_SUFFIXES

    procs = _procs(predictors)
    if any(c in EXTRA_CONT_NAMES and c not in df.columns for proc in procs for c in proc.cont_names):
        df = add_meta_features(df)  # the models were trained with them: computed over this table
        for p in predictors:
            check_file_features(p.spec, df)
    cats = list(dict.fromkeys(c for proc in procs for c in proc.cat_names))
    conts = list(dict.fromkeys(c for proc in procs for c in proc.cont_names
                               if c not in EXTRA_CONT_NAMES and not c.endswith(PATIENT_SUFFIXES)))
    relative = list(dict.fromkeys(c[: -len(s)] for proc in procs for c in proc.cont_names for s in PATIENT_SUFFIXES
                                  if c.endswith(s)))
    return clean_table(df, cats, conts, relative)  # over the predicted table, as training did


def no_metadata(predictors, table: pd.DataFrame) -> np.ndarray:
    """Bool per row of a `model_table`: every field the user gives is missing, so a model with an image head scores
    the row with it. All False for image-only models."""
    import torch

    procs = _procs(predictors)
    if not procs or table.empty:
        return np.zeros(len(table), dtype=bool)
    return procs[0].no_metadata(torch.from_numpy(procs[0].encode(table))).numpy()


def form_fields(predictors) -> list[dict]:
    """The fields a form asks for, from what the run's models learned: each given column once, a categorical one with
    the categories seen in training (every fold's), a continuous one as a number."""
    out = {}
    for proc in _procs(predictors):
        for c in proc.given_columns:
            if c in proc.cat_names:
                f = out.setdefault(c, dict(name=c, kind="category", choices=[]))
                f["choices"] = sorted(set(f["choices"]) | set(proc.vocab[c]))
            else:
                out.setdefault(c, dict(name=c, kind="number"))
    return list(out.values())


def unseen_values(predictors, table) -> dict:
    """column -> {value: images} of the categories in `table` (cleaned, as `model_table` returns it) that no fold model
    saw in training. The model scores them through its `unknown` slot, which training barely taught: neither the
    category nor a missing field (a misspelt or new site, `leg` for `lower extremity`)."""
    out = {}
    for c in {c for proc in _procs(predictors) for c in proc.given_columns if c in proc.cat_names}:
        if c not in table.columns:
            continue
        known = set().union(*(proc.vocab.get(c, []) for proc in _procs(predictors)))
        values = table[c].dropna().astype(str)
        counts = values[~values.isin(known)].value_counts()
        if len(counts):
            out[c] = {str(v): int(n) for v, n in counts.items()}
    return out


def unseen_note(unseen: dict) -> str | None:
    "The warning for `unseen_values`, or None."
    if not unseen:
        return None
    said = "; ".join(f"{c} " + ", ".join(f"{v!r} ({n} image{'s' if n > 1 else ''})" for v, n in vals.items())
                     for c, vals in unseen.items())
    return (f"metadata values the run never saw in training: {said}. They are scored through the model's unknown "
            "slot, not as the category they may mean, nor as a missing field: check the spelling against the "
            "training categories, or leave the field empty")


def upload_refusal(predictors, what: str) -> str | None:
    """Why one image at a time (a web upload, an exported graph) cannot be scored as training scored it, or None:
    `--patient-features` compare each lesion with the same patient's others in the table, and `--extra-meta` counts
    the patient's images in the table and reads the file's size as the training files were made. `what` names the
    surface."""
    specs = [p.spec for p in predictors]
    if any(s.patient_features for s in specs):
        return (f"this run was trained with --patient-features, computed over each patient's other lesions in the "
                f"table: {what} sees one image at a time and cannot compute them. Use `melafast predict` with the "
                "whole table, or a run trained without --patient-features")
    if any(s.extra_meta for s in specs):
        return (f"this run was trained with --extra-meta (images per patient, counted over the table; log file size, "
                f"which depends on how the files were made): {what} cannot compute them as training did. Use "
                "`melafast predict` with the table and image files, or a run trained without --extra-meta")
    return None
