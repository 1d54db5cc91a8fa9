"""Folds: patient-grouped, target-stratified cross-validation, and the rows that only ever train (external data,
pseudo-labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .tables import read_table

__all__ = ["make_folds", "add_external", "read_pseudo", "add_pseudo"]


def make_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Return a copy of `df` with an int `fold` column: grouped by `patient_id`, stratified by `target`.

    Rows with an empty `patient_id` are each their own group. The same seed always gives the same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise DataError(f"n_folds must be at least 2, got {n_folds}")
    if "target" not in df.columns:
        raise DataError("make_folds needs a target column")
    pid = df["patient_id"] if "patient_id" in df.columns else pd.Series(np.nan, index=df.index)
    groups = pid.where(pid.notna(), pd.Series([f"\0row{i}" for i in range(len(df))], index=df.index))
    n_groups = groups.nunique()
    if n_groups < n_folds:
        raise DataError(f"{n_folds} folds need at least {n_folds} patients, but the data has {n_groups}")
    codes = pd.factorize(groups)[0]
    folds = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(df)), df["target"].to_numpy(), codes)):
        folds[valid] = k
    out = df.copy()
    out["fold"] = folds
    return out


def add_external(df: pd.DataFrame, external: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Append `external` rows to a folded `df` as training-only rows (`fold = -1`), dropping image names `df`
    already has. Returns the combined table and the number of duplicates dropped."""
    dup = external["image_name"].isin(df["image_name"]) | external["image_name"].duplicated()
    ext = external[~dup].assign(fold=-1)
    return pd.concat([df, ext], ignore_index=True), int(dup.sum())


def read_pseudo(path) -> pd.DataFrame:
    """A pseudo-label table written by `melafast pseudo`: `image_name` and `soft_target` in [0, 1], checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pseudo-label file {path} does not exist (write one with `melafast pseudo --run DIR`)")
    table = read_table(path, required=("image_name", "soft_target"))
    soft = pd.to_numeric(table["soft_target"], errors="coerce")
    if soft.isna().any() or ((soft < 0) | (soft > 1)).any():
        raise DataError(f"{path}: soft_target must be a probability in [0, 1] on every row")
    return table.assign(soft_target=soft.astype(np.float64))[["image_name", "soft_target"]]


def add_pseudo(df: pd.DataFrame, test: pd.DataFrame | None, pseudo: pd.DataFrame) -> pd.DataFrame:
    """Append pseudo-labelled test rows to a folded `df` as training-only rows (`fold = -1`).

    `pseudo` (from `read_pseudo`) names test images and their soft target; their images and metadata come from
    `test` (the dataset's test.csv, read by `load_competition`). Every row of the result gets a `soft_target`:
    the real 0/1 label for labelled rows, the pseudo probability for the added ones. Test images that are
    already training rows are not added twice.
    """
    if test is None:
        raise DataError("pseudo-labels name test images, but this dataset has no test.csv")
    missing = pseudo.loc[~pseudo["image_name"].isin(test["image_name"]), "image_name"]
    if len(missing):
        raise DataError(f"{len(missing)} pseudo-labelled image(s) are not in this dataset's test.csv, e.g. "
                        f"{', '.join(missing.head(3))}: were the pseudo-labels made for another dataset?")
    rows = test.merge(pseudo, on="image_name", how="inner")
    rows = rows[~rows["image_name"].isin(df["image_name"])]
    rows = rows.assign(target=(rows["soft_target"] >= 0.5).astype(int), fold=-1)
    base = df.assign(soft_target=df["target"].astype(np.float64)) if "soft_target" not in df else df
    out = pd.concat([base, rows], ignore_index=True)
    out["soft_target"] = out["soft_target"].fillna(out["target"].astype(np.float64))
    return out
