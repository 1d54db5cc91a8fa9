"""The metadata columns of a table: the competition's own (sex, age, site) cleaned to one spelling, and the columns
a user declares (`--cat`, `--cont`) checked against label leaks and read the same way in training and prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import DataError

__all__ = ["CAT_NAMES", "CONT_NAMES", "SEXES", "HOLES", "LEAK_COLUMNS", "LEAK_PREFIXES", "ID_COLUMNS", "norm_text",
           "clean_metadata", "resolve_columns", "clean_columns"]

CAT_NAMES = ("sex", "anatom_site_general_challenge")  # categorical metadata of the competition CSVs
CONT_NAMES = ("age_approx",)  # continuous metadata of the competition CSVs
SEXES = {"male": "male", "female": "female", "m": "male", "f": "female"}  # spellings of sex that are read
HOLES = {"", "na", "n/a", "nan", "none", "null", "unknown", "missing", "?", "-"}  # how tables write "not known"


def norm_text(s: pd.Series) -> pd.Series:
    "Lower-case, stripped strings; anything empty or not a string becomes missing."
    return s.map(lambda v: v.strip().lower() if isinstance(v, str) and v.strip() else np.nan).astype(object)


def _hole(v) -> bool:
    "True for a value that says 'not known': empty, NaN, None, or a word such as unknown or n/a."
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return True
    return isinstance(v, str) and v.strip().lower() in HOLES


def _refuse(df: pd.DataFrame, bad: pd.Series, column: str, what: str, source) -> None:
    "Raise one DataError naming the values of `column` that cannot be what the column means."
    if not bad.any():
        return
    i = int(np.flatnonzero(bad.to_numpy())[0])
    values = ", ".join(repr(v) for v in pd.unique(df.loc[bad, column].astype(object))[:5])
    raise DataError(f"{source or 'the metadata'}: {int(bad.sum())} value(s) of {column} cannot be {what}: {values} "
                    f"(first in row {i + 2}, image {df['image_name'].iloc[i] if 'image_name' in df else '?'}); correct "
                    "them, or leave the cells empty where the value is not known")


def clean_metadata(df: pd.DataFrame, source=None) -> pd.DataFrame:
    """Return a copy with `sex` in {male, female} or missing, float `age_approx`, normalised site names.

    Holes (empty cells, NaN, `unknown`, `n/a`, ...) become missing, which the models treat as unknown. A value that
    cannot be what its column means (a sex that is not male/female/m/f, an age that is not a number from 0 to 120, a
    site that is a bare number) raises `DataError` naming `source`, the column and the values: read as missing it
    would send the image down the model's missing-metadata path without a word. Metadata columns absent from the
    table are added as all-missing, so datasets without them still work.
    """
    df = df.copy()
    for c in (*CAT_NAMES, *CONT_NAMES):
        if c not in df.columns:
            df[c] = np.nan
    holes = {c: df[c].map(_hole).astype(bool) for c in (*CAT_NAMES, *CONT_NAMES)}
    sex = df["sex"].map(lambda v: SEXES.get(v.strip().lower()) if isinstance(v, str) else None)
    _refuse(df, ~holes["sex"] & sex.isna(), "sex", "a sex (male, female, m or f)", source)
    df["sex"] = sex.where(sex.notna(), np.nan).astype(object)
    age = pd.to_numeric(df["age_approx"].where(~holes["age_approx"]), errors="coerce").astype(float)
    _refuse(df, ~holes["age_approx"] & ~age.between(0, 120), "age_approx", "an age in years (0 to 120)", source)
    df["age_approx"] = age
    site = df["anatom_site_general_challenge"]
    _refuse(df, ~holes["anatom_site_general_challenge"] & pd.to_numeric(site, errors="coerce").notna(),
            "anatom_site_general_challenge", "a body site (a name such as torso; numbers are codes of some other "
            "table)", source)
    df["anatom_site_general_challenge"] = norm_text(site.where(~holes["anatom_site_general_challenge"]))
    if "patient_id" in df.columns:
        df["patient_id"] = df["patient_id"].map(lambda v: v.strip() if isinstance(v, str) and v.strip() else np.nan).astype(object)
    if "target" in df.columns:
        t = pd.to_numeric(df["target"], errors="coerce")
        bad = ~t.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"target must be 0 or 1, but row {i + 2} ({df['image_name'].iloc[i]}) has {df['target'].iloc[i]!r}")
        df["target"] = t.astype(int)
    return df


# columns that are, or are derived from, the label: never a feature (ISIC 2024: iddx_*, mel_*; 2020: diagnosis, ...)
LEAK_COLUMNS = ("target", "diagnosis", "benign_malignant", "lesion_id", "soft_target", "home_fold", "fold")
LEAK_PREFIXES = ("iddx_", "mel_", "soft_target_")
ID_COLUMNS = ("image_name", "isic_id", "patient_id", "fname", "attribution", "copyright_license")


def resolve_columns(train: pd.DataFrame, test: pd.DataFrame | None, cat=(), cont=(), log=print) -> tuple[list, list]:
    """The metadata columns a user declared (`--cat`, `--cont`), checked against the tables: each must be in
    train.csv, none may be the label or derived from it (or an identifier), and a column that test.csv lacks is never
    a feature (said once, and dropped). Nothing declared: the 2020 columns (sex, site; age)."""
    cat, cont = [str(c) for c in cat], [str(c) for c in cont]
    if not cat and not cont:
        return list(CAT_NAMES), list(CONT_NAMES)
    both = sorted(set(cat) & set(cont))
    if both:
        raise DataError(f"{', '.join(both)} declared both categorical (--cat) and continuous (--cont): choose one")
    for c in [*cat, *cont]:
        if c in LEAK_COLUMNS or c.startswith(LEAK_PREFIXES):
            raise DataError(f"the column {c!r} is the label or derived from it (a diagnosis, a histology measure, a "
                            "lesion id): it can never be a feature")
        if c in ID_COLUMNS:
            raise DataError(f"the column {c!r} identifies an image or a patient: it can never be a feature")
    wrong = [c for c in cont if c in CAT_NAMES]
    if wrong:
        raise DataError(f"{', '.join(wrong)} holds categories, not numbers: declare it with --cat")
    missing = [c for c in [*cat, *cont] if c not in train.columns]
    if missing:
        raise DataError(f"declared metadata column(s) {', '.join(map(repr, missing))} not in train.csv (its columns: "
                        f"{', '.join(map(str, train.columns[:12]))}{' ...' if len(train.columns) > 12 else ''})")
    if test is not None:
        absent = [c for c in [*cat, *cont] if c not in test.columns]
        if absent:
            log(f"metadata column(s) {', '.join(absent)} are in train.csv but not in test.csv: never a feature (a "
                "model could not be given them at prediction)")
            cat, cont = [c for c in cat if c not in absent], [c for c in cont if c not in absent]
    return cat, cont


def _category_text(v):
    "A category as text; a number the same however the table stored it (3, 3.0 and '3.0' are all '3')."
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return v
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return v
        return str(int(x)) if x.is_integer() else v
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    x = float(v)
    return str(int(x)) if x.is_integer() else str(x)


def clean_columns(df: pd.DataFrame, cat=(), cont=(), source=None) -> pd.DataFrame:
    """`df` with declared metadata columns cleaned as the 2020 ones are: categorical values as stripped lower-case
    text, continuous ones as numbers, holes (empty, NaN, unknown, n/a, ...) missing; a continuous value that is not a
    number raises `DataError` naming the column. Columns `df` lacks are added as all-missing."""
    df = df.copy()
    for c in [*cat, *cont]:
        if c not in df.columns:
            df[c] = np.nan
    for c in cat:
        if c not in (*CAT_NAMES, *CONT_NAMES):
            holes = df[c].map(_hole).astype(bool)
            df[c] = norm_text(df[c].where(~holes).map(_category_text))
    for c in cont:
        if c not in (*CAT_NAMES, *CONT_NAMES):
            holes = df[c].map(_hole).astype(bool)
            x = pd.to_numeric(df[c].where(~holes), errors="coerce").astype(float)
            _refuse(df, ~holes & x.isna(), c, "a number (a continuous column, --cont)", source)
            df[c] = x
    return df
