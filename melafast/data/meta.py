"""The metadata vector: age, sex and site (and optional extras) encoded with statistics fitted on training rows."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from fastai.torch_core import TensorBase

from ..errors import DataError
from .tables import CAT_NAMES, CONT_NAMES

__all__ = ["EXTRA_CONT_NAMES", "MetaProcessor", "MetaStack", "TensorMeta", "add_meta_features"]

EXTRA_CONT_NAMES = ("n_images", "log_file_size")  # optional features of the 2020 winners, see add_meta_features


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



class TensorMeta(TensorBase):
    """A batch of metadata vectors: a type of its own so image augmentations leave it alone."""

    def show(self, ctx=None, **kwargs):
        return ctx
