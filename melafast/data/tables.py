"""Read competition-style tables: the CSVs (their metadata cleaned by `columns`), and where their images are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..layout import split_csv
from .columns import clean_metadata

__all__ = ["IMAGE_EXTS", "read_table", "find_image_dir", "load_split", "load_competition", "image_folder",
           "image_table", "find_dataset", "common_names"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def read_table(csv, required=("image_name",)) -> pd.DataFrame:
    """Read one competition CSV, checking that it has rows, the `required` columns and unique image names."""
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(f"{csv} not found: a dataset folder needs train.csv (and test.csv to predict)")
    try:
        df = pd.read_csv(csv, dtype={"image_name": str, "isic_id": str, "patient_id": str}, low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv} is empty: it needs a header line and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv} is not a readable CSV file ({e})") from None
    df = common_names(df)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{csv} lacks the column(s) {', '.join(missing)}; found: {', '.join(map(str, df.columns))}")
    if df.empty:
        raise DataError(f"{csv} has a header but no rows")
    names = df["image_name"].astype(str).str.strip()
    if df["image_name"].isna().any() or (names == "").any():
        raise DataError(f"{csv} has rows with an empty image_name (first at row {int(np.flatnonzero(df['image_name'].isna() | (names == ''))[0]) + 2})")
    dups = names[names.duplicated()]
    if len(dups):
        raise DataError(f"{csv} lists {len(dups)} image_name(s) twice, e.g. {', '.join(dups.unique()[:3])}; drop the duplicate rows")
    bad = names[names.str.contains(r"[/\\]|\.\.", regex=True)]
    if len(bad):
        raise DataError(f"{csv}: image_name must be a plain file name, but {bad.iloc[0]!r} holds a path ({len(bad)} such rows)")
    df["image_name"] = names
    return df


def common_names(df: pd.DataFrame) -> pd.DataFrame:
    "The ISIC 2024 layout's columns under the names melafast reads: isic_id as image_name, the site under both names."
    if "isic_id" in df.columns and "image_name" not in df.columns:
        df = df.rename(columns={"isic_id": "image_name"})
    if "anatom_site_general" in df.columns and "anatom_site_general_challenge" not in df.columns:
        df = df.assign(anatom_site_general_challenge=df["anatom_site_general"])  # 2024's name of the 2020 site column
    return df


def _image_index(folder: Path) -> dict[str, str]:
    "Map each image's stem (and full name) in `folder` to its file name, in one directory scan."
    index = {}
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() in IMAGE_EXTS:
                index.setdefault(stem, e.name)
                index[e.name] = e.name
    return index


def _candidate_dirs(root: Path, split: str) -> list[Path]:
    "Folders that may hold a split's images, most likely first: jpeg/train, jpeg224/train, train, images, ..."
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (p.name != "jpeg", p.name))
    cands = [d / split for d in subdirs] + [root / split, root / "images"] + subdirs + [root]
    return [d for d in dict.fromkeys(cands) if d.is_dir()]


def find_image_dir(root, names, split="train") -> Path:
    """Find the folder under `root` that holds the images `names` (stems or file names) for `split`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    probe = list(names[:3])
    for d in _candidate_dirs(root, split):
        if any((d / n).is_file() or any((d / f"{n}{e}").is_file() for e in IMAGE_EXTS) for n in probe):
            return d
    raise DataError(f"no folder under {root} holds the {split} images (looked for {probe[0]}.jpg/.jpeg/.png in "
                    f"jpeg/{split}, {split}/, images/ and the other subfolders); pass images=PATH (CLI: --images PATH)")


def _attach_fnames(df: pd.DataFrame, folder: Path, csv_name: str) -> pd.DataFrame:
    index = _image_index(folder)
    files = df["image_name"].map(index)
    missing = df["image_name"][files.isna()]
    if len(missing):
        raise DataError(f"{len(missing)} of {len(df)} images listed in {csv_name} are missing from {folder}: "
                        f"{', '.join(missing.iloc[:5])}{' ...' if len(missing) > 5 else ''}")
    df = df.copy()
    df["fname"] = [os.path.join(folder, f) for f in files]
    return df


def load_split(path, split: str = "test", images=None) -> pd.DataFrame | None:
    """Read one split of a dataset folder, `train.csv` or `test.csv`, with cleaned metadata and an absolute `fname`.

    Only that split's images must exist: a folder with `test.csv` and the test images is enough to predict.
    Returns None when `test.csv` is absent; a missing `train.csv` is an error. `images` overrides the image folder.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, got {split!r}")
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist")
    csv = split_csv(path, split)
    if split == "test" and not csv.is_file():
        return None
    root = Path(images).expanduser().resolve() if images is not None else path
    df = clean_metadata(read_table(csv, required=("image_name", "target") if split == "train" else ("image_name",)), csv)
    from .store import STORE_SUFFIXES, find_store

    store = root if root.suffix.lower() in STORE_SUFFIXES else (find_store(root, split) if root.is_dir() else None)
    if store is not None and (images is not None or not _has_image_dir(root, df["image_name"].tolist(), split)):
        return _attach_store(df, store, csv.name)
    return _attach_fnames(df, find_image_dir(root, df["image_name"].tolist(), split), csv.name)


def _has_image_dir(root, names, split) -> bool:
    try:
        find_image_dir(root, names, split)
        return True
    except DataError:
        return False


def _attach_store(df: pd.DataFrame, store: Path, csv_name: str) -> pd.DataFrame:
    "`fname`s that name each image inside the HDF5 `store` (checked: every image_name is an id in it)."
    from .store import store_index, stored_name

    if not store.is_file():
        raise DataError(f"image store {store} does not exist")
    missing = df["image_name"][~store_index(store).contains(df["image_name"])]  # (indexes the store, once)
    if len(missing):
        raise DataError(f"{len(missing)} of {len(df)} images listed in {csv_name} are not in {store}: "
                        f"{', '.join(missing.iloc[:5])}{' ...' if len(missing) > 5 else ''}")
    df = df.copy()
    df["fname"] = [stored_name(store.resolve(), n) for n in df["image_name"]]
    return df


def load_competition(path, images=None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read `train.csv` (and `test.csv` when present) from `path`, clean metadata, add an absolute `fname` column.

    The image folder is detected (`jpeg/train`, `jpeg224/train`, `train/`, `images/`, ...); `images` overrides it.
    """
    return load_split(path, "train", images), load_split(path, "test", images)


def image_folder(folder, meta=None) -> pd.DataFrame:
    """A table of every image in `folder` (.jpg, .jpeg, .png; sorted by name): `image_name` (the file's stem) and
    an absolute `fname`, with the metadata of `meta` (a CSV path or a DataFrame with an `image_name` column) joined
    on `image_name`. Images without a metadata row get missing values, which the models treat as unknown.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTS
                   and (folder / f).is_file())
    if not files:
        raise DataError(f"{folder} holds no .jpg, .jpeg or .png images")
    df = pd.DataFrame({"image_name": [os.path.splitext(f)[0] for f in files],
                       "fname": [str(folder / f) for f in files]})
    dup = df["image_name"][df["image_name"].duplicated()]
    if len(dup):
        raise DataError(f"{folder} holds two images named {dup.iloc[0]} (e.g. .jpg and .png): keep one")
    return image_table(df, meta)


def image_table(images, meta=None) -> pd.DataFrame:
    """The rows to predict, from what a user has at hand: a folder of images, one image path, a list of image paths,
    or a DataFrame with an `fname` column (e.g. from `load_competition`). `meta` (a CSV path or a DataFrame with
    `image_name`) adds metadata by image name; without it, or for images it does not list, metadata is missing.
    """
    if isinstance(images, pd.DataFrame):
        if "fname" not in images.columns:
            raise DataError("a DataFrame of images needs an fname column (read the data with load_competition)")
        df = images
    elif isinstance(images, (str, os.PathLike)) and Path(images).expanduser().is_dir():
        return image_folder(images, meta)
    elif isinstance(images, (str, os.PathLike)) and Path(images).suffix.lower() in (".hdf5", ".h5") \
            and Path(images).expanduser().is_file():  # every image of an HDF5 store, by id
        from .store import store_ids, stored_name

        store = Path(images).expanduser().resolve()
        ids = store_ids(store)
        df = pd.DataFrame({"image_name": ids, "fname": [stored_name(store, i) for i in ids]})
    else:
        paths = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.expanduser().is_file()]
        if missing:
            raise DataError(f"{len(missing)} image file(s) not found: {', '.join(missing[:3])}")
        df = pd.DataFrame({"image_name": [p.stem for p in paths], "fname": [str(p.expanduser().resolve()) for p in paths]})
    source = None
    if meta is not None:
        table = read_table(meta) if not isinstance(meta, pd.DataFrame) else common_names(meta)
        source = meta if not isinstance(meta, pd.DataFrame) else "the metadata table"
        table = clean_metadata(table, source)  # its own rows, so that an error names the row of that table
        cols = [c for c in table.columns if c not in ("fname", "target") and (c == "image_name" or c not in df.columns)]
        df = df.merge(table[cols].astype({"image_name": str}), on="image_name", how="left")
    return clean_metadata(df, source)


def find_dataset(path) -> Path | None:
    """The dataset folder at `path`: `path` itself if it holds train.csv (or ISIC 2024's train-metadata.csv), else
    `path/sample` if that does, else None."""
    path = Path(path)
    for p in (path, path / "sample"):
        if (p / "train.csv").is_file() or (p / "train-metadata.csv").is_file():
            return p
    return None
