"""Read competition-style datasets, clean their metadata, make patient-grouped folds, build DataLoaders."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

__all__ = [
    "IMAGE_EXTS", "CAT_NAMES", "CONT_NAMES", "load_competition", "load_split", "image_folder", "image_table",
    "read_table",
    "clean_metadata",
    "find_image_dir", "make_folds", "MetaProcessor", "TensorMeta", "melanoma_dls", "inference_dl",
    "default_item_tfms", "default_batch_tfms", "make_sample", "find_dataset", "check_images", "BAD_IMAGE_MODES",
    "diagnosis_labels", "TARGETS", "add_external", "add_meta_features", "EXTRA_CONT_NAMES", "AUG_PRESETS",
    "add_pseudo", "read_pseudo", "SoftLabel", "TensorSoftLabel", "MetaStack", "TrainOnly",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
CAT_NAMES = ("sex", "anatom_site_general_challenge")  # categorical metadata of the competition CSVs
CONT_NAMES = ("age_approx",)  # continuous metadata of the competition CSVs
EXTRA_CONT_NAMES = ("n_images", "log_file_size")  # optional features of the 2020 winners, see add_meta_features
TARGETS = ("melanoma", "diagnosis")  # what melanoma_dls can train on
_SEXES = ("male", "female")


# --------------------------------------------------------------------------------------------------
# Reading a dataset folder


def read_table(csv, required=("image_name",)) -> pd.DataFrame:
    """Read one competition CSV, checking that it has rows, the `required` columns and unique image names."""
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(f"{csv} not found: a dataset folder needs train.csv (and test.csv to predict)")
    try:
        df = pd.read_csv(csv, dtype={"image_name": str, "patient_id": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv} is empty: it needs a header line and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv} is not a readable CSV file ({e})") from None
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


def _norm_text(s: pd.Series) -> pd.Series:
    "Lower-case, stripped strings; anything empty or not a string becomes missing."
    return s.map(lambda v: v.strip().lower() if isinstance(v, str) and v.strip() else np.nan).astype(object)


def clean_metadata(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with `sex` in {male, female} or missing, float `age_approx`, normalised site names.

    Metadata columns absent from the CSV are added as all-missing, so external datasets without them still work.
    """
    df = df.copy()
    for c in (*CAT_NAMES, *CONT_NAMES):
        if c not in df.columns:
            df[c] = np.nan
    sex = _norm_text(df["sex"])
    df["sex"] = sex.where(sex.isin(_SEXES), np.nan)
    age = pd.to_numeric(df["age_approx"], errors="coerce").astype(float)
    df["age_approx"] = age.where((age >= 0) & (age <= 120))  # out of range is a data-entry error, not an age
    df["anatom_site_general_challenge"] = _norm_text(df["anatom_site_general_challenge"])
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
    csv = path / f"{split}.csv"
    if split == "test" and not csv.is_file():
        return None
    root = Path(images).expanduser().resolve() if images is not None else path
    df = clean_metadata(read_table(csv, required=("image_name", "target") if split == "train" else ("image_name",)))
    return _attach_fnames(df, find_image_dir(root, df["image_name"].tolist(), split), csv.name)


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
    else:
        paths = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.expanduser().is_file()]
        if missing:
            raise DataError(f"{len(missing)} image file(s) not found: {', '.join(missing[:3])}")
        df = pd.DataFrame({"image_name": [p.stem for p in paths], "fname": [str(p.expanduser().resolve()) for p in paths]})
    if meta is not None:
        table = read_table(meta) if not isinstance(meta, pd.DataFrame) else meta
        cols = [c for c in table.columns if c not in ("fname", "target") and (c == "image_name" or c not in df.columns)]
        df = df.merge(table[cols].astype({"image_name": str}), on="image_name", how="left")
    return clean_metadata(df)


def find_dataset(path) -> Path | None:
    """The dataset folder at `path`: `path` itself if it holds train.csv, else `path/sample` if that does, else None."""
    path = Path(path)
    for p in (path, path / "sample"):
        if (p / "train.csv").is_file():
            return p
    return None


BAD_IMAGE_MODES = ("error", "skip")


def _image_problem(fname: str) -> str | None:
    "Why `fname` cannot be used as an image, or None when it can (empty, unreadable, truncated JPEG)."
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(fname)
        if size == 0:
            return "empty file"
        with Image.open(fname) as im:
            fmt = im.format
            if fmt == "PNG":
                im.verify()  # reads every chunk and checks its CRC
        if fmt == "JPEG":
            with open(fname, "rb") as f:
                f.seek(max(0, size - 1024))
                if b"\xff\xd9" not in f.read():  # a complete JPEG ends with the EOI marker
                    return "truncated JPEG"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({str(e).splitlines()[0][:80]})"
    return None


def check_images(df: pd.DataFrame, on_bad: str = "error", workers: int = 8, progress: bool = True):
    """Check every `fname` of `df` is a usable image: not empty, readable, not a truncated JPEG.

    `on_bad="error"` raises one `DataError` listing the bad files; `"skip"` drops them.
    Returns `(good_rows, bad)` where `bad` is a DataFrame of image_name, fname, problem.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress as shown

    if on_bad not in BAD_IMAGE_MODES:
        raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_MODES)}, got {on_bad!r}")
    fnames = df["fname"].tolist()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # file reads and PIL header parsing release the GIL
        problems = list(shown(pool.map(_image_problem, fnames, chunksize=64), total=len(fnames),
                              label="image check", display=progress and len(fnames) > 1000))
    is_bad = np.array([p is not None for p in problems], dtype=bool)
    bad = pd.DataFrame({"image_name": df["image_name"].to_numpy()[is_bad], "fname": np.asarray(fnames, dtype=object)[is_bad],
                        "problem": [p for p in problems if p is not None]})
    if len(bad) and on_bad == "error":
        listed = "; ".join(f"{r.fname} ({r.problem})" for r in bad.head(3).itertuples())
        raise DataError(f"{len(bad)} of {len(df)} images cannot be used: {listed}{' ...' if len(bad) > 3 else ''}. "
                        "Replace them, or leave them out with --on-bad-image skip (on_bad_image='skip')")
    return df[~is_bad], bad


# --------------------------------------------------------------------------------------------------
# Folds


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


# --------------------------------------------------------------------------------------------------
# Metadata preprocessing


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


@dataclass
class MetaProcessor:
    """Metadata -> float vector, fitted on a training split; its state is plain JSON (`to_dict`/`from_dict`).

    Layout: for each continuous column, the standardised value (0 when missing) and a missing flag;
    for each categorical column, one-hot over the training vocabulary plus an `unknown` slot, and a missing flag.
    """

    cat_names: list = field(default_factory=lambda: list(CAT_NAMES))  # categorical columns, in order
    cont_names: list = field(default_factory=lambda: list(CONT_NAMES))  # continuous columns, in order
    vocab: dict = field(default_factory=dict)  # column -> sorted categories seen in training
    means: dict = field(default_factory=dict)  # column -> training mean (missing values excluded)
    stds: dict = field(default_factory=dict)  # column -> training std (1.0 when constant)

    @classmethod
    def fit(cls, df: pd.DataFrame, cat_names=CAT_NAMES, cont_names=None) -> "MetaProcessor":
        """Learn vocabularies and scaling from the rows of `df` (the training split only).

        `cont_names` defaults to `age_approx` plus the extra features of `add_meta_features` present in `df`.
        """
        if cont_names is None:
            cont_names = (*CONT_NAMES, *(c for c in EXTRA_CONT_NAMES if c in df.columns))
        vocab = {c: sorted(map(str, df[c].dropna().unique())) if c in df else [] for c in cat_names}
        means, stds = {}, {}
        for c in cont_names:
            x = pd.to_numeric(df[c], errors="coerce").dropna() if c in df else pd.Series(dtype=float)
            means[c] = float(x.mean()) if len(x) else 0.0
            sd = float(x.std(ddof=0)) if len(x) else 0.0
            stds[c] = sd if sd > 1e-8 else 1.0
        return cls(list(cat_names), list(cont_names), vocab, means, stds)

    @property
    def feature_names(self) -> list[str]:
        names = []
        for c in self.cont_names:
            names += [c, f"{c}_missing"]
        for c in self.cat_names:
            names += [f"{c}={v}" for v in self.vocab[c]] + [f"{c}=unknown", f"{c}_missing"]
        return names

    @property
    def n_features(self) -> int:
        """Width of the metadata vector."""
        return 2 * len(self.cont_names) + sum(len(self.vocab[c]) + 2 for c in self.cat_names)

    def encode_row(self, row) -> np.ndarray:
        """One row (a pandas Series or a dict) -> float32 vector of width `n_features`."""
        out = np.zeros(self.n_features, dtype=np.float32)
        i = 0
        for c in self.cont_names:
            v = row.get(c)
            v = float(v) if not _missing(v) else math.nan
            if math.isnan(v):
                out[i + 1] = 1.0
            else:
                out[i] = (v - self.means[c]) / self.stds[c]
            i += 2
        for c in self.cat_names:
            voc, v = self.vocab[c], row.get(c)
            if _missing(v):
                out[i + len(voc) + 1] = 1.0
            else:
                v = str(v).strip().lower()
                j = voc.index(v) if v in voc else len(voc)  # unseen categories share the unknown slot
                out[i + j] = 1.0
            i += len(voc) + 2
        return out

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """All rows of `df` -> float32 array of shape (len(df), n_features)."""
        rows = df.to_dict("records")
        return np.stack([self.encode_row(r) for r in rows]) if rows else np.zeros((0, self.n_features), np.float32)

    def __call__(self, row):
        import torch

        return TensorMeta(torch.from_numpy(self.encode_row(row)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MetaProcessor":
        """Rebuild from `to_dict` output, checking its shape (it may come from a file)."""
        try:
            proc = cls(list(d["cat_names"]), list(d["cont_names"]), {k: [str(x) for x in v] for k, v in d["vocab"].items()},
                       {k: float(v) for k, v in d["means"].items()}, {k: float(v) for k, v in d["stds"].items()})
            assert all(c in proc.vocab for c in proc.cat_names)
            assert all(c in proc.means and c in proc.stds for c in proc.cont_names)
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError):
            raise DataError(f"invalid metadata preprocessing state: {json.dumps(d)[:200]}") from None
        return proc


class MetaStack:
    """Several fitted `MetaProcessor`s side by side: one row -> their encodings concatenated (one per fold model),
    so one pass over the images can feed every fold. `slices[i]` picks model i's part (None: no metadata)."""

    def __init__(self, procs: list):
        self.procs, self.slices, start = [p for p in procs if p is not None], [], 0
        for p in procs:
            self.slices.append(None if p is None else slice(start, start + p.n_features))
            start += 0 if p is None else p.n_features

    def __call__(self, row):
        import torch

        return TensorMeta(torch.from_numpy(np.concatenate([p.encode_row(row) for p in self.procs])))


def add_meta_features(df: pd.DataFrame) -> pd.DataFrame:
    """Add the winners' extra metadata: `n_images` (images of the same patient in this table; 1 without an id)
    and `log_file_size` (log of the image file's bytes, which tracks the camera and resolution).

    Compute them on each table separately (train, test) and on the same image copies you will predict on.
    """
    out = df.copy()
    if "patient_id" in out.columns and out["patient_id"].notna().any():
        counts = out.groupby("patient_id")["image_name"].transform("size")
        out["n_images"] = counts.where(out["patient_id"].notna(), 1).astype(float)
    else:
        out["n_images"] = 1.0
    out["log_file_size"] = np.log1p([os.path.getsize(f) for f in out["fname"]])
    return out


# --------------------------------------------------------------------------------------------------
# fastai pieces

import torch  # noqa: E402  (after the torch-free helpers above)
from .hostsync import async_copies, async_copy_dl  # noqa: E402
from fastai.torch_core import TensorBase  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    Category, CategoryBlock, CategoryMap, ColReader, DisplayedTransform, DataBlock, IndexSplitter, IntToFloatTensor,
    PILImage, Resize, ResizeMethod,
    TfmdDL, TransformBlock, Datasets, ToTensor, aug_transforms,
)


class TensorMeta(TensorBase):
    """A batch of metadata vectors: a type of its own so image augmentations leave it alone."""

    def show(self, ctx=None, **kwargs):
        return ctx


class _OpenImage:
    "Open an image as RGB, letting JPEG decode at a reduced scale when the file is much larger than `size`."

    def __init__(self, size=None):
        self.size = size

    def __call__(self, fn):
        from PIL import Image

        try:
            im = Image.open(fn)
            if self.size and im.format == "JPEG":
                im.draft("RGB", (self.size, self.size))  # decodes at 1/2, 1/4 or 1/8 scale, never below size
            return PILImage(im.convert("RGB"))  # grayscale, RGBA, palette PNGs: all become RGB
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {fn} ({str(e).splitlines()[0][:80]}); check the images first with "
                            "melafast.data.check_images, or use --on-bad-image skip") from None


class TensorSoftLabel(TensorBase):
    """Per-class target probabilities of a batch (N, n_classes): real labels one-hot, pseudo-labels soft."""


class SoftLabel(DisplayedTransform):
    """Melanoma probability `p` -> target probabilities `[1 - p, p]` over the classes `vocab` = [0, 1]."""

    def __init__(self):
        self.vocab = CategoryMap([0, 1], sort=False)

    def encodes(self, p: float):
        p = float(p)
        return TensorSoftLabel(torch.tensor([1.0 - p, p]))

    def decodes(self, t: TensorSoftLabel):
        return Category(self.vocab[int(t.argmax(-1))])


def _image_block(size):
    return TransformBlock(type_tfms=_OpenImage(size), batch_tfms=IntToFloatTensor)


def default_item_tfms(size: int):
    """Per-image transforms: squash to `size` x `size` (dermoscopy keeps the lesion centred; no crop loses it)."""
    return [Resize(size, method=ResizeMethod.Squish)]


AUG_PRESETS = ("light", "medium", "heavy")


class TrainOnly(DisplayedTransform):
    """Apply a random batch augmentation to training batches only; other batches pass through untouched.

    fastai's affine augmentations (flips, turns, rotation, zoom) still resample every validation batch through an
    identity warp (a wasted `grid_sample`, and pixels that move by 1e-6); wrapped, validation skips them.
    """

    split_idx = 0

    def __init__(self, tfm):
        super().__init__()
        self.tfm, self.order = tfm, tfm.order

    def __call__(self, b, split_idx=None, **kwargs):
        return self.tfm(b, split_idx=split_idx, **kwargs) if split_idx == 0 else b

    def decode(self, b, **kwargs):
        return self.tfm.decode(b, **kwargs)

    def setup(self, items=None, train_setup=False):
        return self.tfm.setup(items, train_setup)

    def __repr__(self):
        return f"TrainOnly({self.tfm!r})"


def _train_only(tfms):
    from fastai.vision.augment import AffineCoordTfm

    return [TrainOnly(t) if isinstance(t, AffineCoordTfm) and t.size is None else t for t in tfms]


def default_batch_tfms(aug: str = "medium"):
    """GPU batch augmentations for dermoscopy (lesions have no up or down: all 8 flips/turns in every preset).

    light: flips/turns and mild lighting; medium: + rotate 20 degrees, zoom 1.15, lighting 0.2;
    heavy: + rotate 45, zoom 1.3, slight warp, stronger lighting, saturation and hue, up to 3 erased patches.
    """
    from fastai.vision.augment import Hue, RandomErasing, Saturation

    if aug == "light":
        return _train_only(aug_transforms(flip_vert=True, max_rotate=0.0, max_zoom=1.0, max_lighting=0.1, max_warp=0.0))
    if aug == "medium":
        return _train_only(aug_transforms(flip_vert=True, max_rotate=20.0, max_zoom=1.15, max_lighting=0.2,
                                          max_warp=0.0, p_affine=0.75, p_lighting=0.75))
    if aug == "heavy":
        return [*_train_only(aug_transforms(flip_vert=True, max_rotate=45.0, max_zoom=1.3, max_lighting=0.3, max_warp=0.1,
                                p_affine=0.9, p_lighting=0.9)),
                Saturation(max_lighting=0.3, p=0.75), Hue(max_hue=0.05, p=0.75), RandomErasing(p=0.5, max_count=3)]
    raise DataError(f"aug must be one of {', '.join(AUG_PRESETS)}, got {aug!r}")


def _dl_kwargs(num_workers, device):
    import torch

    kw = {}
    if num_workers is not None:
        kw["num_workers"] = num_workers
        if num_workers > 0:
            kw["persistent_workers"] = True
    if device is not None:
        kw["device"] = device
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if cuda:
        kw["pin_memory"] = True
    return kw


def melanoma_dls(
    df: pd.DataFrame,
    fold: int = 0,  # rows with this `fold` form the validation set
    size: int = 384,  # square image size fed to the model
    bs: int = 64,  # batch size
    meta: bool = True,  # add the metadata vector as a second input
    item_tfms=None,  # per-image transforms; default `default_item_tfms(size)`
    batch_tfms=None,  # per-batch (GPU) transforms; default `default_batch_tfms(aug)`
    aug: str = "medium",  # augmentation preset when batch_tfms is None: light, medium or heavy
    meta_proc: MetaProcessor | None = None,  # fitted metadata preprocessing; default: fit on the training rows
    num_workers: int | None = None,  # DataLoader worker processes; default fastai's (one per core, at most 16)
    device=None,  # where batches go; default the GPU when there is one
    upsample: int = 1,  # each melanoma of the training split appears this many times per epoch
    target: str = "melanoma",  # melanoma: 2 classes; diagnosis: one class per `diagnosis` value (melanoma scored)
    **kwargs,  # passed on to `DataBlock.dataloaders`
):
    """DataLoaders of `(image, meta), target` (or `(image,), target` with `meta=False`) for one fold of `df`.

    Rows with `fold == -1` (external data) only ever train. The validation rows are never upsampled.
    """
    need = [c for c in ("fname", "target", "fold") if c not in df.columns]
    if need:
        hint = " (run make_folds first)" if "fold" in need else " (read the data with load_competition)"
        raise DataError(f"melanoma_dls needs the column(s) {', '.join(need)}{hint}")
    if size <= 0 or bs <= 0:
        raise DataError(f"size and bs must be positive, got size={size}, bs={bs}")
    if upsample < 1:
        raise DataError(f"upsample must be 1 or more, got {upsample}")
    if target not in TARGETS:
        raise DataError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    soft = "soft_target" in df.columns
    if soft and target != "melanoma":
        raise DataError("soft targets (pseudo-labels) are melanoma probabilities: use them with target='melanoma'")
    df = df.reset_index(drop=True)
    if soft:  # rows without a soft target are labelled ones: their label is their target probability
        df["soft_target"] = pd.to_numeric(df["soft_target"], errors="coerce").fillna(df["target"]).astype(float)
    is_valid = (df["fold"] == fold).to_numpy()
    if not is_valid.any():
        raise DataError(f"fold {fold} has no rows; folds present: {sorted(df['fold'].unique().tolist())}")
    proc = meta_proc or MetaProcessor.fit(df[~is_valid])
    if upsample > 1:
        extra = df[~is_valid & (df["target"] == 1).to_numpy()]
        df = pd.concat([df, *[extra] * (upsample - 1)], ignore_index=True)
        is_valid = (df["fold"] == fold).to_numpy()
    if target == "diagnosis":
        df = df.assign(diagnosis_label=diagnosis_labels(df))
        y_col, vocab = "diagnosis_label", sorted(df["diagnosis_label"].unique())
    else:
        y_col, vocab = ("soft_target" if soft else "target"), [0, 1]
    inputs, getters = [_image_block(size)], [ColReader("fname")]
    if meta:
        inputs.append(TransformBlock())
        getters.append(proc)
    dblock = DataBlock(
        blocks=(*inputs, TransformBlock(type_tfms=SoftLabel()) if soft else CategoryBlock(vocab=vocab)), n_inp=len(inputs),
        getters=[*getters, ColReader(y_col)], splitter=IndexSplitter(np.flatnonzero(is_valid)),
        item_tfms=default_item_tfms(size) if item_tfms is None else item_tfms,
        batch_tfms=default_batch_tfms(aug) if batch_tfms is None else batch_tfms,
    )
    dls = dblock.dataloaders(df, bs=bs, **_dl_kwargs(num_workers, device), **kwargs)
    dls.meta_proc, dls.size, dls.meta = proc, size, meta  # what a saved model needs to rebuild its inputs
    if torch.device(dls.device or "cpu").type == "cuda":
        async_copies(dls, dls.device)  # pinned batches reach the GPU without making the host wait
    dls.soft = soft  # targets are per-class probabilities (pseudo-labels): the learner picks a matching loss
    return dls


def diagnosis_labels(df: pd.DataFrame) -> pd.Series:
    """One class per lower-cased `diagnosis` value; every `target == 1` row is `melanoma`, missing is `unknown`.

    A row labelled benign (`target == 0`) whose diagnosis says melanoma becomes `unknown`: the target column wins.
    """
    if "diagnosis" not in df.columns:
        raise DataError("target='diagnosis' needs a diagnosis column in train.csv")
    diag = _norm_text(df["diagnosis"]).fillna("unknown")
    diag = diag.where(~((df["target"] == 0) & (diag == "melanoma")), "unknown")
    return diag.where(df["target"] == 0, "melanoma")


def inference_dl(df: pd.DataFrame, size: int, meta_proc=None, bs: int = 64,
                 num_workers: int | None = None, device=None) -> TfmdDL:
    """An unshuffled DataLoader of `(image, meta)` (or `(image,)`) for rows with an `fname`, no labels needed.

    It uses the same image opening and resizing as the validation set of `melanoma_dls`. `meta_proc` is a
    fitted `MetaProcessor` (or a `MetaStack` of several), or None for images only.
    """
    if "fname" not in df.columns:
        raise DataError("inference_dl needs an fname column (read the data with load_competition)")
    tfms = [[ColReader("fname"), _OpenImage(size)]]
    if meta_proc is not None:
        tfms.append([meta_proc])
    dsets = Datasets(df.reset_index(drop=True), tfms=tfms, n_inp=len(tfms))
    dl = TfmdDL(dsets, bs=bs, shuffle=False, drop_last=False, after_item=[*default_item_tfms(size), ToTensor()],
                after_batch=[IntToFloatTensor()], **_dl_kwargs(num_workers, device))
    if dl.device is not None and dl.device.type == "cuda":
        async_copy_dl(dl, dl.device)  # pinned batches reach the GPU without making the host wait
    return dl


# --------------------------------------------------------------------------------------------------
# Synthetic sample

_SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital"]
_SITE_P = [0.5, 0.25, 0.15, 0.06, 0.025, 0.015]
_SITE_RISK = {"torso": 0.4, "head/neck": 0.6, "lower extremity": -0.2, "upper extremity": -0.2,
              "palms/soles": -0.5, "oral/genital": 0.0}


def _lesion_image(rng: np.random.Generator, m: float, px: int) -> np.ndarray:
    "A skin-coloured square with one lesion; malignancy score `m` makes it larger, darker, irregular, variegated."
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px - 0.5
    skin = np.array([225, 175, 145], np.float32) * rng.uniform(0.85, 1.05) + rng.normal(0, 6, 3)
    img = skin + 12 * (xx + yy)[..., None] * rng.normal(1, 0.3) + rng.normal(0, 5, (px, px, 3))
    cy, cx = rng.normal(0, 0.05, 2)
    ang, theta = np.arctan2(yy - cy, xx - cx), rng.uniform(0, np.pi)
    r = np.hypot(yy - cy, xx - cx)
    s = 1 / (1 + np.exp(-m))  # 0..1 malignancy
    base = rng.uniform(0.12, 0.18) + 0.14 * s
    elong = 1 + rng.uniform(0, 0.25) + 0.35 * s * rng.random()
    border = sum(rng.normal(0, 0.02 + 0.09 * s) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in range(2, 7))
    radius = base * (1 + border) / np.sqrt(np.cos(ang - theta) ** 2 + (elong * np.sin(ang - theta)) ** 2)
    inside = np.clip((radius - r) / 0.015, 0, 1)[..., None]
    brown = np.array([150, 95, 60], np.float32) * (1 - 0.55 * s) + rng.normal(0, 8, 3)
    lesion = brown + rng.normal(0, 4, (px, px, 3))
    n_blots = rng.poisson(4 * s ** 2)
    for _ in range(n_blots):  # blue-grey and black areas appear in malignant-looking lesions
        by, bx = rng.normal(cy, base / 2), rng.normal(cx, base / 2)
        blot = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (base / 4) ** 2))[..., None]
        lesion = lesion * (1 - 0.8 * blot) + 0.8 * blot * np.array(rng.choice([[40, 40, 60], [90, 100, 130], [25, 20, 20]]))
    img = img * (1 - inside) + lesion * inside
    return np.clip(img, 0, 255).astype(np.uint8)


def make_sample(dest, n_train: int = 240, n_test: int = 60, seed: int = 0, px: int = 96) -> Path:
    """Write a small **synthetic** dataset in the Kaggle layout to `dest` and return its path.

    `train.csv`, `test.csv`, `sample_submission.csv`, `jpeg/train`, `jpeg/test`. The label depends on both the
    picture (lesion size, darkness, border, colours) and the metadata (age, site, sex), so a model learns from
    each. Image names start with `SYNTH_`; these are not real lesions.
    """
    from PIL import Image

    dest = Path(dest)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    n_patients = max(2, int(n * 0.45))
    patient = rng.integers(0, n_patients, n)
    p_sex = rng.choice(["male", "female"], n_patients)
    p_age = np.clip(np.round(rng.normal(50, 15, n_patients) / 5) * 5, 15, 90)
    p_risk = rng.normal(0, 0.6, n_patients)  # some patients carry more risk: images of one patient correlate
    sex = np.where(rng.random(n) < 0.05, "", p_sex[patient]).astype(object)
    age = np.where(rng.random(n) < 0.05, np.nan, p_age[patient])
    site = np.where(rng.random(n) < 0.05, "", rng.choice(_SITES, n, p=_SITE_P)).astype(object)
    m = rng.normal(0, 1, n) + p_risk[patient]
    meta_z = np.nan_to_num((age - 50) / 15) + np.array([_SITE_RISK.get(s, 0.0) for s in site]) + 0.3 * (sex == "male")
    logit = 2.2 * m + 1.4 * meta_z - 1.6
    target = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    names = [f"SYNTH_{i:06d}" for i in range(n)]
    df = pd.DataFrame({"image_name": names, "patient_id": [f"SYNTH_P{p:05d}" for p in patient], "sex": sex,
                       "age_approx": age, "anatom_site_general_challenge": site, "target": target})
    for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
        folder = dest / "jpeg" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n)[part]:
            Image.fromarray(_lesion_image(rng, m[i], px)).save(folder / f"{names[i]}.jpg", quality=90)
    df.iloc[:n_train].to_csv(dest / "train.csv", index=False)
    df.iloc[n_train:].drop(columns="target").to_csv(dest / "test.csv", index=False)
    pd.DataFrame({"image_name": names[n_train:], "target": 0.0}).to_csv(dest / "sample_submission.csv", index=False)
    (dest / "README.txt").write_text(
        f"SYNTHETIC melanoma sample made by melafast.make_sample(seed={seed}): {n_train} train and {n_test} test\n"
        "images of drawn lesions, not real patients. For trying melafast out; scores on it mean nothing clinically.\n")
    return dest
