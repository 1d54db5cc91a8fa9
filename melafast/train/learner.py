"""`melanoma_learner`: a fastai Learner with a real splitter, a melanoma AUC metric, fast AdamW and mixed precision."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import fastai.vision.all  # noqa: F401  (fastai's methods on Learner: fine_tune, lr_find, to_fp16, tta, show_results...)
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.learner import Learner, Metric
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import OptimWrapper
from fastai.torch_core import to_detach
from fastcore.basics import patch
from fastcore.foundation import L
from fastcore.meta import delegates

from ..errors import MelafastError
from . import interpret  # noqa: F401  (registers fastai's plot_top_losses for image + metadata batches)
from ..metrics import auc as _auc
from .hostsync import sync_free
from ..inference import predict_probs, resolve_precision
from ..model import MelanomaModel, melanoma_splitter
from ..progress import LineProgress, interactive

__all__ = ["melanoma_learner", "MelanomaLearner", "MelanomaAUC", "SoftTargetCrossEntropy", "melanoma_probs",
           "melanoma_index", "FrozenBN", "ImageHeadLoss", "dihedral_tta", "amp_dtype"]


class MelanomaLearner(Learner):
    """A fastai `Learner` whose `fine_tune` trains the unfrozen backbone at the head's learning rate by default.

    fastai's `fine_tune` gives the backbone 1/100 of the head's rate (`lr_mult=100`); with melafast's two
    parameter groups that leaves a pretrained backbone nearly still. On HAM10000 (lite0, 96 px, 3 epochs) image-only
    out-of-fold AUC went 0.698 / 0.748 / 0.780 / 0.823 for lr_mult 100 / 10 / 3 / 1 (docs/results.md).
    """

    def fine_tune(self, epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=1, pct_start=0.3, div=5.0, **kwargs):
        return super().fine_tune(epochs, base_lr=base_lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult,
                                 pct_start=pct_start, div=div, **kwargs)

    @contextmanager
    def no_bar(self):
        "Hide the progress display inside; afterwards put back the same one (fastai's puts back a bar of its own)."
        cb = getattr(self, "progress", None)
        if cb is not None:
            self.remove_cb(cb)
        try:
            yield self
        finally:
            if cb is not None:
                self.add_cb(cb)


class FrozenBN(Callback):
    """While training, every batch norm whose weights are frozen runs in eval mode: its running statistics stay put.

    fastai's `BnFreeze` only knows `nn.BatchNorm1d/2d/3d`; this one knows every `_BatchNorm`, so it also holds the
    `SyncBatchNorm` layers of data-parallel training and timm's `BatchNormAct2d` / `SyncBatchNormAct`.
    """

    run_after = TrainEvalCallback

    def before_train(self):
        for m in self.learn.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine and not m.weight.requires_grad:
                m.eval()


class ImageHeadLoss(Callback):
    """Trains the image head of a metadata model, and through it the backbone, on every training row: adds `weight` x
    the loss of its logits to the loss each batch back-propagates (the logged `train_loss` stays the joint head's;
    `lr_find` follows the image head's loss, the one the backbone learns from).

    The model's backbone learns from this loss alone, as an image-only model's does; the joint head fuses the metadata
    onto its features without back-propagating into them, and the metadata side draws its random numbers apart
    (`SideGenerator`). So a patient who comes without metadata, whom the model sends to the image head, is scored by
    the image-only model of the same seed and settings (bit for bit on the CPU), not by the image part of the joint
    head's one linear layer, which was fitted beside the metadata and leaves to it what the metadata says.
    """

    order = 60  # after MixedPrecision (order 10) has left autocast: this loss is taken in fp32 like the main one

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def _model(self):
        m = self.learn.model
        return getattr(m, "module", m)  # the MelanomaModel inside DistributedDataParallel

    def after_loss(self):
        logits = getattr(self._model(), "image_logits", None)
        if not self.training or logits is None or not len(self.learn.yb):
            return
        extra = self.weight * self.learn.loss_func(logits.float(), *self.learn.yb)
        # only the gradient: the logged train_loss stays the joint head's, comparable with valid_loss
        self.learn.loss_grad = self.learn.loss_grad + extra
        if getattr(self.learn, "lr_finder", None) is not None:
            # lr_find follows the image head's loss: the learning rate is chosen for the backbone, which learns from
            # it alone, as an image-only model's lr_find would choose it
            self.learn.loss = (extra / self.weight).detach()

    def after_batch(self):
        self._model().image_logits = None  # no graph of this batch kept alive into the next


class MelanomaAUC(Metric):
    """ROC AUC of the melanoma probability (softmax column `pos`) over the whole validation set.

    fastai's `RocAucBinary` scores the last column, which is wrong as soon as there are more than two classes.
    """

    def __init__(self, pos: int = 1, name: str = "melanoma_auc"):
        self.pos, self._name = pos, name
        self.reset()

    def reset(self):
        self.probs, self.targs = [], []

    def accumulate(self, learn):
        # the Learner's own to_detach gathers across processes (and drops padding) when training is distributed
        detach = getattr(learn, "to_detach", to_detach)
        # kept on the device until the end of validation: no host sync per batch
        self.probs.append(detach(torch.softmax(learn.pred.float(), dim=-1)[:, self.pos], cpu=False))
        y = learn.y.argmax(-1) if learn.y.ndim == 2 else learn.y  # soft targets: validation rows are one-hot
        self.targs.append(detach((y == self.pos).long(), cpu=False))  # gloo cannot gather bools

    @property
    def value(self):
        if not self.probs:
            return None
        return _auc(torch.cat(self.targs).cpu().numpy(), torch.cat(self.probs).cpu().numpy())

    @property
    def name(self):
        return self._name


class SoftTargetCrossEntropy(torch.nn.Module):
    """Cross-entropy against per-class target probabilities (N, C), as pseudo-labels need; class indices work too.

    Behaves like fastai's `CrossEntropyLossFlat` for predictions: softmax activation, argmax decoding.
    """

    def forward(self, pred, targ):
        targ = targ.float() if targ.is_floating_point() else targ
        return torch.nn.functional.cross_entropy(pred.float(), torch.Tensor(targ))  # a plain tensor: no fastai dispatch

    def activation(self, x):
        return torch.softmax(x, dim=-1)

    def decodes(self, x):
        return x.argmax(dim=-1)


def melanoma_index(vocab) -> int:
    """Which output is melanoma: class `1` of a melanoma target, class `melanoma` of a diagnosis target."""
    vocab = list(vocab)
    for key in (1, "melanoma"):
        if key in vocab:
            return vocab.index(key)
    raise MelafastError(f"no melanoma class among the targets {vocab}")


def melanoma_probs(probs, pos: int = 1) -> np.ndarray:
    """The melanoma column of a (N, n_out) probability matrix, as a numpy array."""
    return np.asarray(probs[:, pos], dtype=np.float64)


def _adamw(device):
    # torch's fused/foreach AdamW updates all tensors in a few kernels; fastai's optimizers loop in Python
    fast = dict(fused=True) if torch.device(device).type == "cuda" else dict(foreach=True)
    return partial(OptimWrapper, opt=torch.optim.AdamW, **fast)


@delegates(Learner.__init__)
def melanoma_learner(
    dls,  # from `melanoma_dls`
    arch: str = "efficientnet_b3",  # any timm model name
    meta: bool = True,  # fuse the metadata vector (the dls must carry it)
    pretrained: bool = True,  # start from ImageNet weights (hub, hub cache or `weights`)
    weights=None,  # local timm checkpoint (.safetensors or .pth state dict)
    precision: str = "auto",  # auto | bf16 | fp16 | fp32
    model_kwargs: dict | None = None,  # passed on to `MelanomaModel` (meta_sizes, head_drop, drop_samples, ...)
    compile: bool = False,  # torch.compile the backbone: faster steps on GPUs after a slow first one
    frozen_bn: bool = True,  # a frozen backbone's batch-norm running statistics stay fixed too (`FrozenBN`)
    image_head: bool = True,  # with metadata: an image-only head for rows without any patient field (`ImageHeadLoss`)
    **kwargs,
) -> Learner:
    """A fastai `Learner` for melanoma: image + metadata model, AUC metric, AdamW, mixed precision on GPUs.

    With metadata and `image_head` (the default) the model also has an image-only head, trained on every row by
    `ImageHeadLoss`, which scores the rows that come without any patient field.

    `learn.freeze()` freezes the whole backbone, so `fine_tune`'s frozen epochs train only the metadata MLP and the
    head: the backbone's weights, its batch-norm weights and (with `frozen_bn`, the default) its batch-norm running
    statistics stay as they are. Pretrained learners start frozen, as fastai's `vision_learner` does.
    """
    if meta and dls.n_inp < 2:
        raise MelafastError("these DataLoaders carry no metadata: build them with melanoma_dls(..., meta=True) "
                            "or pass meta=False")
    device = dls.device or torch.device("cpu")
    precision = resolve_precision(precision, device)  # before any weights are loaded: fail fast
    n_meta = dls.meta_proc.n_features if meta else 0
    vocab = list(dls.vocab)
    model_kwargs = dict(model_kwargs or {})
    if meta and image_head:
        model_kwargs.setdefault("blank_flags", dls.meta_proc.patient_flags())
    model = MelanomaModel(arch, n_meta=n_meta, n_out=len(vocab), pretrained=pretrained, weights=weights, **model_kwargs)
    model.to(device)  # before the optimizer is made: fused AdamW needs its tensors on the GPU
    kwargs.setdefault("loss_func", SoftTargetCrossEntropy() if getattr(dls, "soft", False) else CrossEntropyLossFlat())
    kwargs.setdefault("opt_func", _adamw(device))
    kwargs.setdefault("metrics", [MelanomaAUC(pos=melanoma_index(vocab))])
    kwargs.setdefault("train_bn", False)
    if frozen_bn:  # batch-norm layers whose weights are frozen run in eval mode: their statistics stop moving too
        kwargs["cbs"] = [*L(kwargs.get("cbs")), FrozenBN()]
    if model.image_head is not None:
        kwargs["cbs"] = [*L(kwargs.get("cbs")), ImageHeadLoss()]
    learn = sync_free(MelanomaLearner(dls, model, splitter=melanoma_splitter, **kwargs))
    if not interactive() and hasattr(learn, "progress"):  # a log, not a screen: one line per epoch, not a bar
        learn.remove_cb(learn.progress)
        learn.add_cb(LineProgress())
    learn.arch, learn.precision = arch, precision
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if compile:
        model.backbone.compile()  # in place: parameter names, and so saved checkpoints, stay the same
    if precision in ("bf16", "fp16"):
        from fastai.callback.fp16 import MixedPrecision

        learn.add_cb(MixedPrecision(amp_mode=precision))
    if pretrained or weights is not None:
        learn.freeze()
    return learn


def amp_dtype(learn):
    "The autocast dtype of `learn`'s mixed precision (None without it)."
    mp = getattr(learn, "mixed_precision", None)
    if mp is None:
        return None
    return torch.bfloat16 if mp.amp_mode.value == "bf16" else torch.float16


@patch
def dihedral_tta(self: Learner, dl=None, n: int = 8, progress: bool = True) -> torch.Tensor:
    """Class probabilities over `dl` (default the validation set), the mean over `n` fixed dihedral views.

    Unlike fastai's `learn.tta()` nothing is random: the same views every time, in the learner's own precision.
    Also `dihedral_tta(learn, ...)`.
    """
    dl = self.dls.valid if dl is None else dl
    model = getattr(self.model, "module", self.model)  # inside DistributedDataParallel while a fit runs
    return predict_probs(model, dl, n=n, amp_dtype=amp_dtype(self), n_inp=self.dls.n_inp, progress=progress)


dihedral_tta = Learner.dihedral_tta  # noqa: F811 (fastcore's @patch returns nothing: the function, callable as dihedral_tta(learn)
