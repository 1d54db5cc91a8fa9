"""fastai pieces: the image and metadata blocks, augmentations, and the DataLoaders for training and inference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.torch_core import TensorBase
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import Category, CategoryMap, ColReader, IndexSplitter, IntToFloatTensor
from fastai.vision.augment import Resize, ResizeMethod, aug_transforms
from fastai.vision.core import ToTensor
from fasttransform import DisplayedTransform

from ..config import AUG_PRESETS, META_DROPOUT, TARGETS
from ..errors import DataError
from .transfer import async_copies, async_copy_dl
from .images import OpenImage
from .store import index_stores
from .meta import MetaDropout, MetaProcessor
from .columns import norm_text

__all__ = ["NegativeDraw", "melanoma_dls", "inference_dl", "default_item_tfms", "default_batch_tfms",
           "diagnosis_labels", "SoftLabel", "TensorSoftLabel", "TrainOnly"]



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
    return TransformBlock(type_tfms=OpenImage(size), batch_tfms=IntToFloatTensor)


def default_item_tfms(size: int):
    """Per-image transforms: squash to `size` x `size` (dermoscopy keeps the lesion centred; no crop loses it)."""
    return [Resize(size, method=ResizeMethod.Squish)]




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
    meta_dropout: float = META_DROPOUT,  # training rows' patient fields blanked with this probability (`MetaDropout`)
    dropout_patterns: str = "subsets",  # which fields a dropped row loses: subsets or all_or_one (`MetaDropout`)
    cat_names=None,  # categorical metadata columns (with cont_names: instead of the 2020 sex and site)
    cont_names=None,  # continuous metadata columns (instead of age; the extra features join when present)
    neg_per_pos: int | None = None,  # each epoch: every training melanoma and this many times as many others, drawn
    seed: int = 0,  # the draws of `neg_per_pos` (epoch e of this fold draws with seed + e)
    **kwargs,  # passed on to `DataBlock.dataloaders`
):
    """DataLoaders of `(image, meta), target` (or `(image,), target` with `meta=False`) for one fold of `df`.

    Rows with `fold == -1` (external data, pseudo-labels) only ever train, except in the fold named by their
    `home_fold` (external rows of a patient whom this fold validates): there they are left out. The validation
    rows are never upsampled, and their metadata is never blanked. With `neg_per_pos` K, each training epoch reads
    every melanoma and K times as many other rows, freshly drawn (`NegativeDraw`); validation still reads every row.
    """
    need = [c for c in ("fname", "target", "fold") if c not in df.columns]
    if need:
        hint = " (run make_folds first)" if "fold" in need else " (read the data with load_competition)"
        raise DataError(f"melanoma_dls needs the column(s) {', '.join(need)}{hint}")
    if size <= 0 or bs <= 0:
        raise DataError(f"size and bs must be positive, got size={size}, bs={bs}")
    if upsample < 1:
        raise DataError(f"upsample must be 1 or more, got {upsample}")
    if neg_per_pos is not None and neg_per_pos < 1:
        raise DataError(f"neg_per_pos must be 1 or more, got {neg_per_pos}")
    if target not in TARGETS:
        raise DataError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not 0 <= meta_dropout < 1:
        raise DataError(f"meta_dropout must be in [0, 1), got {meta_dropout}")
    df = df[_columns_read(df, cat_names, cont_names, meta_proc)]  # the datasets copy rows: only what they read
    soft = "soft_target" in df.columns
    if soft and target != "melanoma":
        raise DataError("soft targets (pseudo-labels) are melanoma probabilities: use them with target='melanoma'")
    if "home_fold" in df.columns:  # another dataset's images of a patient validated here must not train this fold
        df = df[~(pd.to_numeric(df["home_fold"], errors="coerce") == fold).to_numpy()]
    df = df.reset_index(drop=True)
    if soft:  # rows without a soft target are labelled ones: their label is their target probability
        df["soft_target"] = pd.to_numeric(df["soft_target"], errors="coerce").fillna(df["target"]).astype(float)
    is_valid = (df["fold"] == fold).to_numpy()
    if not is_valid.any():
        raise DataError(f"fold {fold} has no rows; folds present: {sorted(df['fold'].unique().tolist())}")
    if meta_proc is None and (cat_names or cont_names):
        from .features import EXTRA_CONT_NAMES
        from .columns import clean_columns, resolve_columns

        cat_names, cont_names = resolve_columns(df, None, cat_names or (), cont_names or ())
        cont_names = [*cont_names, *(c for c in EXTRA_CONT_NAMES if c in df.columns and c not in cont_names)]
        df = clean_columns(df, cat_names, cont_names)
        meta_proc = MetaProcessor.fit(df[~is_valid], cat_names=cat_names, cont_names=cont_names)
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
    batch_tfms = default_batch_tfms(aug) if batch_tfms is None else list(batch_tfms)
    if meta:
        inputs.append(TransformBlock())
        getters.append(proc)
        if meta_dropout:
            batch_tfms.append(MetaDropout(proc, meta_dropout, dropout_patterns))
    dblock = DataBlock(
        blocks=(*inputs, TransformBlock(type_tfms=SoftLabel()) if soft else CategoryBlock(vocab=vocab)), n_inp=len(inputs),
        getters=[*getters, ColReader(y_col)], splitter=IndexSplitter(np.flatnonzero(is_valid)),
        item_tfms=default_item_tfms(size) if item_tfms is None else item_tfms,
        batch_tfms=batch_tfms,
    )
    index_stores(df["fname"])  # before the workers fork, so that they share it
    dls = dblock.dataloaders(df, bs=bs, **_dl_kwargs(num_workers, device), **kwargs)
    dls.meta_proc, dls.size, dls.meta = proc, size, meta  # what a saved model needs to rebuild its inputs
    dls.meta_dropout = meta_dropout if meta else 0.0
    if torch.device(dls.device or "cpu").type == "cuda":
        async_copies(dls, dls.device)  # pinned batches reach the GPU without making the host wait
    dls.soft = soft  # targets are per-class probabilities (pseudo-labels): the learner picks a matching loss
    if neg_per_pos is not None:
        draw = NegativeDraw(df["target"].to_numpy()[~is_valid] == 1, neg_per_pos, seed)  # the training rows, in order
        dls.train.get_idxs, dls.train.n = draw, draw.n  # fastai asks for the epoch's indices in the main process
    return dls


def _columns_read(df: pd.DataFrame, cat_names, cont_names, meta_proc) -> list:
    """The columns of `df` that `melanoma_dls` reads (images, labels, folds, the metadata columns that may be
    features) and the ids by which users find rows. Keeping only these is what lets a table of 400,000 rows and 50
    columns cost the datasets (which copy their rows) a part of the table itself."""
    from .columns import CAT_NAMES, CONT_NAMES
    from .features import EXTRA_CONT_NAMES

    used = {"image_name", "patient_id", "fname", "target", "fold", "home_fold", "soft_target", "diagnosis",
            *CAT_NAMES, *CONT_NAMES, *EXTRA_CONT_NAMES, *(cat_names or ()), *(cont_names or ()),
            *(getattr(meta_proc, "cat_names", ()) or ()), *(getattr(meta_proc, "cont_names", ()) or ())}
    return [c for c in df.columns if c in used]


class NegativeDraw:
    """The indices one training epoch reads: every positive row and `k` times as many negative rows (all of them when
    there are fewer), a fresh draw each epoch (epoch e uses `seed + e`), shuffled."""

    def __init__(self, positive, k: int, seed: int = 0):
        self.pos, self.neg = np.flatnonzero(positive), np.flatnonzero(~np.asarray(positive, dtype=bool))
        if not len(self.pos):
            raise DataError("neg_per_pos needs melanomas in the training rows: this fold has none")
        self.k, self.seed, self.epoch = int(k), int(seed), 0
        self.n = len(self.pos) + min(len(self.neg), self.k * len(self.pos))

    def __call__(self) -> list:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        neg = rng.choice(self.neg, self.n - len(self.pos), replace=False)
        return rng.permutation(np.r_[self.pos, neg]).tolist()


def diagnosis_labels(df: pd.DataFrame) -> pd.Series:
    """One class per lower-cased `diagnosis` value; every `target == 1` row is `melanoma`, missing is `unknown`.

    A row labelled benign (`target == 0`) whose diagnosis says melanoma becomes `unknown`: the target column wins.
    """
    if "diagnosis" not in df.columns:
        raise DataError("target='diagnosis' needs a diagnosis column in train.csv")
    diag = norm_text(df["diagnosis"]).fillna("unknown")
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
    index_stores(df["fname"])  # before the workers fork, so that they share it
    tfms = [[ColReader("fname"), OpenImage(size)]]
    if meta_proc is not None:
        tfms.append([meta_proc])
    dsets = Datasets(df.reset_index(drop=True), tfms=tfms, n_inp=len(tfms))
    dl = TfmdDL(dsets, bs=bs, shuffle=False, drop_last=False, after_item=[*default_item_tfms(size), ToTensor()],
                after_batch=[IntToFloatTensor()], **_dl_kwargs(num_workers, device))
    if dl.device is not None and dl.device.type == "cuda":
        async_copy_dl(dl, dl.device)  # pinned batches reach the GPU without making the host wait
    return dl
