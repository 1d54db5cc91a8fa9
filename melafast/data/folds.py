"""Folds: patient-grouped, target-stratified cross-validation, and the rows that only ever train (external data,
pseudo-labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .tables import read_table

__all__ = ["make_folds", "fold_groups", "join_groups", "add_external", "read_pseudo", "add_pseudo", "pseudo_for_fold", "check_teacher_folds"]


def join_groups(n: int, left, right) -> np.ndarray:
    """A group code per item 0..n-1: items joined by a pair (`left[k]`, `right[k]`) share one, transitively; the
    others stand alone. Codes are numbered in order of each group's first item."""
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(left, right):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the earlier item roots its group
    return pd.factorize(np.array([root(i) for i in range(n)]))[0]


def fold_groups(df: pd.DataFrame, by=("patient_id",)) -> np.ndarray:
    """One group code per row: rows that share a value in any column of `by` (e.g. the same institution, the same
    patient, the same near-duplicate cluster) share a group, joined transitively; a row whose every one of these
    columns is empty stands alone. Columns `df` lacks are skipped."""
    left, right = [], []
    for col in [c for c in by if c in df.columns]:
        codes = pd.Series(pd.factorize(df[col])[0])  # -1: empty
        present = codes[codes >= 0]
        first = pd.Series(present.index, index=present.index).groupby(present.to_numpy()).transform("min")
        left += present.index.tolist()
        right += first.tolist()
    return join_groups(len(df), left, right)


def make_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42, group_by: str = "patient_id",
               together: tuple = ()) -> pd.DataFrame:
    """Return a copy of `df` with an int `fold` column: grouped by `group_by` (default `patient_id`; e.g.
    `attribution` for folds by institution), stratified by `target`.

    A patient's rows always stay in one fold, whatever `group_by` is, and so do rows sharing a value of any column in
    `together` (e.g. a near-duplicate cluster); rows with none of these values are each their own group. The same
    seed always gives the same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise DataError(f"n_folds must be at least 2, got {n_folds}")
    if "target" not in df.columns:
        raise DataError("make_folds needs a target column")
    if group_by != "patient_id" and group_by not in df.columns:
        raise DataError(f"--group-by {group_by}: train.csv has no {group_by} column (it has "
                        f"{', '.join(map(str, df.columns[:12]))})")
    codes = fold_groups(df, (group_by, "patient_id", *together))
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < n_folds:
        what = "patients" if group_by == "patient_id" else f"groups of {group_by} (with each patient kept whole)"
        raise DataError(f"{n_folds} folds need at least {n_folds} {what}, but the data has {n_groups}")
    folds = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(df)), df["target"].to_numpy(), codes)):
        folds[valid] = k
    out = df.copy()
    out["fold"] = folds
    return out


def add_external(df: pd.DataFrame, external: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Append `external` rows to a folded `df` as training-only rows (`fold = -1`), dropping image names `df`
    already has. Returns the combined table and the number of duplicates dropped.

    An external row of a patient who is also in `df` gets that patient's fold as its `home_fold`: it trains every
    fold but the one that validates the patient (`melanoma_dls` leaves it out there), so no fold's CV sees a
    patient's own images in training. `home_fold` is missing for the other external rows.
    """
    dup = external["image_name"].isin(df["image_name"]) | external["image_name"].duplicated()
    ext = external[~dup].assign(fold=-1)
    home = pd.Series(np.nan, index=ext.index)
    if "patient_id" in df.columns and "patient_id" in ext.columns:
        main = df[df["fold"] >= 0].dropna(subset=["patient_id"]).drop_duplicates("patient_id")
        home = ext["patient_id"].map(main.set_index("patient_id")["fold"]).astype(float)
    ext = ext.assign(home_fold=home)
    base = df if "home_fold" in df.columns else df.assign(home_fold=np.nan)
    return pd.concat([base, ext], ignore_index=True), int(dup.sum())


_FOLD_TARGET = "soft_target_fold"  # + k: the soft target the teacher's fold-k model gives (empty: not confident)


def read_pseudo(path) -> pd.DataFrame:
    """A pseudo-label table written by `melafast pseudo`, checked: `image_name`, `soft_target` (the teacher
    ensemble's) and, in tables written since pseudo-labels are made per fold, `soft_target_fold<k>` (the teacher's
    fold-k model's), each a probability in [0, 1] or empty where that model was not confident."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pseudo-label file {path} does not exist (write one with `melafast pseudo --run DIR`)")
    table = read_table(path, required=("image_name", "soft_target"))
    cols = ["soft_target", *sorted((c for c in table.columns if c.startswith(_FOLD_TARGET)),
                                   key=lambda c: int(c[len(_FOLD_TARGET):]) if c[len(_FOLD_TARGET):].isdigit() else -1)]
    if any(not c[len(_FOLD_TARGET):].isdigit() for c in cols[1:]):
        raise DataError(f"{path}: unexpected column among {', '.join(cols[1:])}")
    for c in cols:
        raw = table[c]
        soft = pd.to_numeric(raw, errors="coerce")
        per_fold = len(cols) > 1
        if (soft.isna() & (raw.notna() if per_fold else True)).any() or ((soft < 0) | (soft > 1)).any():
            raise DataError(f"{path}: {c} must be a probability in [0, 1] on every row"
                            + (" (or empty)" if per_fold else ""))
        table[c] = soft.astype(np.float64)
    return table[["image_name", *cols]]


def check_teacher_folds(df: pd.DataFrame, fold_of: dict, source: str, teacher: str = ""):
    """Raise `DataError` unless every labelled row of `df` (`fold >= 0`) is in the same fold as in the teacher run
    whose fold-k model made the pseudo-labels that fold k trains on (`fold_of`: image name -> teacher fold)."""
    main = df[df["fold"] >= 0]
    theirs = main["image_name"].map(fold_of)
    unknown, moved = int(theirs.isna().sum()), int((theirs.notna() & (theirs != main["fold"])).sum())
    if unknown or moved:
        raise DataError(f"the pseudo-labels in {source} were made fold by fold by {teacher or 'another run'}, whose "
                        f"folds differ from this run's: {moved} of {len(main)} images are in another fold there and "
                        f"{unknown} were not in it. Train with the teacher's data, --folds and --seed, so that fold k "
                        "trains only on labels from the teacher's fold-k model")


def pseudo_for_fold(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """The rows fold `k` trains and validates on: the pseudo-labelled rows get the soft target of the teacher's
    fold-k model (those it was not confident about are left out); other rows are unchanged. A table without
    per-fold pseudo-labels is returned as it is."""
    col = f"{_FOLD_TARGET}{k}"
    per_fold = [c for c in df.columns if c.startswith(_FOLD_TARGET)]
    if not per_fold:
        return df
    if col not in df.columns:
        raise DataError(f"the pseudo-labels have no targets for fold {k} (they cover folds "
                        f"{', '.join(c[len(_FOLD_TARGET):] for c in per_fold)})")
    pseudo = df["is_pseudo"].fillna(False).astype(bool) if "is_pseudo" in df.columns else pd.Series(False, index=df.index)
    keep = ~pseudo | df[col].notna()
    out = df[keep.to_numpy()].copy()
    rows = pseudo[keep].to_numpy()
    out.loc[rows, "soft_target"] = out.loc[rows, col]
    out.loc[rows, "target"] = (out.loc[rows, col] >= 0.5).astype(int)
    return out.drop(columns=per_fold)


def add_pseudo(df: pd.DataFrame, test: pd.DataFrame | None, pseudo: pd.DataFrame) -> pd.DataFrame:
    """Append pseudo-labelled test rows to a folded `df` as training-only rows (`fold = -1`).

    `pseudo` (from `read_pseudo`) names test images and their soft target; their images and metadata come from
    `test` (the dataset's test.csv, read by `load_competition`). Every row of the result gets a `soft_target`:
    the real 0/1 label for labelled rows, the pseudo probability for the added ones (the ensemble's; a fold uses
    its own teacher model's through `pseudo_for_fold` when the table has them). Test images that are already
    training rows are not added twice.
    """
    if test is None:
        raise DataError("pseudo-labels name test images, but this dataset has no test.csv")
    missing = pseudo.loc[~pseudo["image_name"].isin(test["image_name"]), "image_name"]
    if len(missing):
        raise DataError(f"{len(missing)} pseudo-labelled image(s) are not in this dataset's test.csv, e.g. "
                        f"{', '.join(missing.head(3))}: were the pseudo-labels made for another dataset?")
    rows = test.merge(pseudo, on="image_name", how="inner")
    rows = rows[~rows["image_name"].isin(df["image_name"])]
    rows = rows.assign(target=(rows["soft_target"].fillna(0) >= 0.5).astype(int), fold=-1, is_pseudo=True)
    base = df.assign(soft_target=df["target"].astype(np.float64)) if "soft_target" not in df else df
    out = pd.concat([base, rows], ignore_index=True)
    out["soft_target"] = out["soft_target"].fillna(out["target"].astype(np.float64))
    return out
