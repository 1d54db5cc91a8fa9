"""The metadata vector: age, sex and site (and any declared columns) encoded with fastai's tabular procs fitted on
training rows, kept as JSON; metadata dropout, which blanks fields of training rows as a real hole looks; and the file
features' own checks."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from fastai.torch_core import TensorBase
from fasttransform import Transform

from ..config import DROPOUT_PATTERNS
from ..errors import DataError
from .features import EXTRA_CONT_NAMES, FILE_FEATURES, PATIENT_SUFFIXES
from .columns import CAT_NAMES, CONT_NAMES

__all__ = ["MetaProcessor", "MetaStack", "TensorMeta", "MetaDropout"]



def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


@dataclass
class MetaProcessor:
    """Metadata -> float vector, fitted on a training split with fastai's tabular procs; its state is plain JSON
    (`to_dict`/`from_dict`, no pickle), so `predict` rebuilds it without fastai's objects.

    `fit` runs fastai's `Categorify`, `FillMissing` (median) and `Normalize` on the training rows (a
    `TabularPandas`) and keeps what they learned: the categories (`vocab`, fastai's classes without `#na#`), the fill
    value of each continuous column (`fill`) and the mean and standard deviation of the filled column (`means`,
    `stds`). Encoding a row does what those procs do to it, laid out for a network's input:
      - each continuous column: its filled, normalised value and a missing flag (FillMissing's `_na` column); a hole
        is the normalised fill value with the flag up, for every column, also those without holes in training;
      - each categorical column: one-hot over the training categories, an `unknown` slot (fastai would send an
        unseen category to `#na#`; here it stays apart from a hole) and a missing slot (fastai's `#na#`).
    A constant column gets standard deviation 1 (fastai's would be 1e-7); a column with no value in training fills
    with 0 and scales by 1. `blank` writes exactly what a hole encodes to, which is what metadata dropout uses.
    """

    cat_names: list = field(default_factory=lambda: list(CAT_NAMES))  # categorical columns, in order
    cont_names: list = field(default_factory=lambda: list(CONT_NAMES))  # continuous columns, in order
    vocab: dict = field(default_factory=dict)  # column -> sorted categories seen in training (Categorify)
    means: dict = field(default_factory=dict)  # column -> training mean of the filled column (Normalize)
    stds: dict = field(default_factory=dict)  # column -> training std of the filled column (Normalize; 1 if constant)
    fill: dict = field(default_factory=dict)  # column -> the value a hole is filled with (FillMissing's median)

    @classmethod
    def fit(cls, df: pd.DataFrame, cat_names=CAT_NAMES, cont_names=None) -> "MetaProcessor":
        """Fit fastai's `Categorify`, `FillMissing` and `Normalize` on the rows of `df` (the training split only)
        and keep their state.

        `cont_names` defaults to `age_approx` plus the extra features of `add_meta_features` present in `df`.
        """
        from fastai.tabular.core import Categorify, FillMissing, FillStrategy, Normalize, TabularPandas

        if cont_names is None:
            cont_names = (*CONT_NAMES, *(c for c in EXTRA_CONT_NAMES if c in df.columns))
        cat_names, cont_names = list(cat_names), list(cont_names)
        table = pd.DataFrame(index=range(len(df)))
        for c in cat_names:  # categories as text, holes as NaN: what Categorify sorts
            col = df[c].reset_index(drop=True) if c in df else pd.Series([np.nan] * len(df))
            table[c] = col.map(lambda v: np.nan if _missing(v) else str(v)).astype(object)
        # continuous columns with at least one value: the procs fit them; the others fill with 0, scale by 1
        known = [c for c in cont_names if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()]
        for c in known:
            table[c] = pd.to_numeric(df[c], errors="coerce").astype("float64").to_numpy()
        vocab, means, stds, fill = {c: [] for c in cat_names}, {}, {}, {}
        if len(df) and (cat_names or known):
            to = TabularPandas(table, procs=[Categorify, FillMissing, Normalize], cat_names=list(cat_names),
                               cont_names=known, reduce_memory=False)
            cats, holes, norm = to.procs.categorify, to.procs.fill_missing.na_dict, to.procs.normalize
            vocab = {c: [str(v) for v in cats.classes[c] if v != "#na#"] for c in cat_names}
            for c in known:
                # FillMissing keeps a fill value only for columns with holes in training; every column here can
                # meet one (a new patient, metadata dropout), so the others get the same statistic
                fill[c] = float(holes[c]) if c in holes else float(FillStrategy.median(table[c], None))
                means[c] = float(norm.means[c])
                sd = float(norm.stds[c])
                stds[c] = sd if sd > 1e-6 else 1.0
        for c in cont_names:
            if c not in known:
                fill[c], means[c], stds[c] = 0.0, 0.0, 1.0
        return cls(cat_names, cont_names, vocab, means, stds, fill)

    def hole_value(self, column) -> float:
        "What a hole in continuous `column` encodes to: its fill value, normalised."
        return (self.fill.get(column, self.means[column]) - self.means[column]) / self.stds[column]

    @property
    def feature_names(self) -> list[str]:
        names = []
        for c in self.cont_names:
            names += [c, f"{c}_missing"]
        for c in self.cat_names:
            names += [f"{c}={v}" for v in self.vocab[c]] + [f"{c}=unknown", f"{c}_missing"]
        return names

    @property
    def patient_columns(self) -> list[str]:
        """The columns that describe the patient or lesion (what a hole can hide); not those read off the file."""
        return [c for c in (*self.cont_names, *self.cat_names) if c not in FILE_FEATURES]

    @property
    def given_columns(self) -> list[str]:
        """The fields a user gives (sex, age, site, any declared column): not the ones melafast derives from the table
        (`n_images`, a column's patient-relative features) or from the file. A row whose every given field is
        missing has no patient metadata: the model routes it to its image head, and `predict` counts it so."""
        return [c for c in self.patient_columns if c not in EXTRA_CONT_NAMES and not c.endswith(PATIENT_SUFFIXES)]

    def field_groups(self) -> list[list[str]]:
        """The patient columns grouped by the field they come from: a given field with its patient-relative features
        (a hole in the field is a hole in them), and each derived column of its own (`n_images`). Metadata dropout
        blanks whole groups, as a real hole does."""
        groups = {c: [c] for c in self.patient_columns if not c.endswith(PATIENT_SUFFIXES)}
        for c in self.patient_columns:
            base = next((c[: -len(s)] for s in PATIENT_SUFFIXES if c.endswith(s)), None)
            if base is not None:
                groups.setdefault(base, []).append(c)  # a base column that is not a feature still groups its own
        return list(groups.values())

    def no_metadata(self, x):
        """Bool (N,) of the encoded rows `x` (a tensor) whose every given field is missing: the one rule the model routes
        by and `predict` counts with."""
        flags = self.patient_flags()
        if not flags:
            return x.new_zeros(x.shape[0], dtype=bool)
        return (x[:, flags] > 0.5).all(dim=1)

    def slots(self) -> dict:
        """Where each column sits in the vector: column -> (slice of its value slots, index of its missing flag)."""
        out, i = {}, 0
        for c in self.cont_names:
            out[c] = (slice(i, i + 1), i + 1)
            i += 2
        for c in self.cat_names:
            n = len(self.vocab[c]) + 1  # the training vocabulary and the unknown slot
            out[c] = (slice(i, i + n), i + n)
            i += n + 1
        return out

    def patient_flags(self) -> list[int]:
        "Where the given fields' missing flags sit in the vector: all of them up means no patient metadata at all."
        slots = self.slots()
        return [slots[c][1] for c in self.given_columns]

    def blank(self, x, columns=None, rows=None):
        """Encoded vectors `x` (N, n_features) with `columns` (default: every patient column) blanked, exactly as
        `encode_row` writes a missing value: a continuous column's normalised fill value, a category's slots 0, and
        the missing flag 1. `rows` (bool (N,) or (N, n_columns) tensor) limits it to some rows, per column; without
        host syncs, so it runs inside the GPU batch pipeline."""
        import torch

        columns = self.patient_columns if columns is None else columns
        slots, out = self.slots(), x.clone()
        for j, c in enumerate(columns):
            values, flag = slots[c]
            hole = self.hole_value(c) if c in self.cont_names else 0.0
            mask = None if rows is None else (rows if rows.ndim == 1 else rows[:, j])
            if mask is None:
                out[:, values], out[:, flag] = hole, 1.0
            else:
                out[:, values] = torch.where(mask[:, None], torch.full_like(out[:, values], hole), out[:, values])
                out[:, flag] = torch.where(mask, torch.ones_like(out[:, flag]), out[:, flag])
        return out

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
                out[i], out[i + 1] = self.hole_value(c), 1.0
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
                       {k: float(v) for k, v in d["means"].items()}, {k: float(v) for k, v in d["stds"].items()},
                       # runs saved before FillMissing: a hole was the mean (normalised 0)
                       {k: float(v) for k, v in d.get("fill", d["means"]).items()})
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


class MetaDropout(Transform):
    """Metadata dropout, on training batches only: each row's patient fields are blanked with probability `p`, exactly
    as `MetaProcessor` encodes a real hole, so the model learns the patterns of missing fields new patients bring.

    `patterns="subsets"` (the default) blanks a random subset of the fields of a dropped row: its size uniform from
    one field to all of them, then which fields uniformly, so "only the age is known" is as common as "only the age is
    missing", for any number of declared columns. `"all_or_one"` (runs saved before it) blanks every field or exactly
    one, half the time each. A field's patient-relative features are blanked with it (`field_groups`); fields read
    off the image file (`FILE_FEATURES`) never are.
    """

    split_idx, order = 0, 5

    def __init__(self, proc: MetaProcessor, p: float = 0.5, patterns: str = "subsets"):
        import torch

        from .side import SideGenerator

        super().__init__()
        if patterns not in DROPOUT_PATTERNS:
            raise DataError(f"metadata dropout patterns must be one of {', '.join(DROPOUT_PATTERNS)}, got {patterns!r}")
        self.proc, self.p, self.patterns = proc, p, patterns
        # all_or_one drew from the columns one by one (as runs saved before `subsets` were trained)
        self.groups = proc.field_groups() if patterns == "subsets" else [[c] for c in proc.patient_columns]
        self.columns = [c for g in self.groups for c in g]
        self._owner = torch.tensor([i for i, g in enumerate(self.groups) for _ in g], dtype=torch.long)
        # its own random numbers: the augmentations draw what they draw without metadata (see SideGenerator)
        self.side = SideGenerator(torch.initial_seed() + 2)

    def blanked_fields(self, n: int, device):
        "Bool (n, number of field groups): which fields of each of `n` rows to blank (no host sync)."
        import torch

        g, k = self.side(device), len(self.groups)
        drop = torch.rand(n, device=device, generator=g) < self.p
        if self.patterns == "all_or_one":
            every = torch.rand(n, device=device, generator=g) < 0.5
            one = torch.randint(k, (n,), device=device, generator=g)
            which = every[:, None] | (one[:, None] == torch.arange(k, device=device))
        else:
            size = torch.randint(1, k + 1, (n, 1), device=device, generator=g)  # how many fields: 1 .. k
            order = torch.rand(n, k, device=device, generator=g).argsort(dim=1).argsort(dim=1)  # a random rank each
            which = order < size
        return drop[:, None] & which

    def encodes(self, x: TensorMeta):
        import torch

        if not self.p or not self.groups:
            return x
        which = self.blanked_fields(x.shape[0], x.device)[:, self._owner.to(x.device)]  # group -> its columns
        return TensorMeta(self.proc.blank(x.as_subclass(torch.Tensor), self.columns, which))


class TensorMeta(TensorBase):
    """A batch of metadata vectors: a type of its own so image augmentations leave it alone."""

    def show(self, ctx=None, **kwargs):
        return ctx
