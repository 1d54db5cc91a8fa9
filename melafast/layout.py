"""Where things are: the file names of a dataset folder, known without reading anything (so commands can check them
before torch loads), and melafast's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["split_csv", "missing_tables", "cache_dir"]


def cache_dir() -> Path:
    "Where melafast keeps what it can compute again (image signatures, store indexes): `$MELAFAST_CACHE`."
    return Path(os.environ.get("MELAFAST_CACHE", Path.home() / ".cache" / "melafast"))


def split_csv(path, split: str) -> Path:
    """The table of `split` in the dataset folder `path`: `<split>.csv`, or the ISIC 2024 layout's
    `<split>-metadata.csv` when only that exists (`<split>.csv` when neither does)."""
    csv = Path(path) / f"{split}.csv"
    alt = Path(path) / f"{split}-metadata.csv"
    return alt if not csv.is_file() and alt.is_file() else csv


def missing_tables(path, splits=("train", "test")) -> list[str]:
    """The splits of `splits` whose table (`split_csv`) the dataset folder `path` lacks."""
    return [s for s in splits if not split_csv(path, s).is_file()]
