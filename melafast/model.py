"""One model for every timm backbone: image features + metadata MLP, fused in a dropout head."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from .data.side import SideGenerator
from .errors import MelafastError, WeightsError

__all__ = ["create_backbone", "MelanomaModel", "melanoma_splitter", "check_arch", "SideDropout", "shades_of_gray"]


def check_arch(arch: str) -> str:
    """Return `arch` if timm knows it, else raise with the closest timm names."""
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
        raise MelafastError(f"unknown architecture {arch!r}{hint}")
    return arch


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot serve weights right now, or None when it answers.

    Asks huggingface_hub itself: its offline mode (HF_HUB_OFFLINE), its endpoint (HF_ENDPOINT, for mirrors) and its
    HTTP session (which honours HTTPS_PROXY and the other proxy variables). One request without retries, so a
    machine with no network gets its answer in seconds rather than after the hub client's retry schedule.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure to get an answer means: no hub here
        return f"the hub at {constants.ENDPOINT} does not answer ({type(e).__name__})"
    return None


def _cached_hub_file(arch: str) -> str | None:
    "The locally cached hub weights for `arch`, if an earlier online run downloaded them."
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for fname in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        hit = fname and try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(hit, str):
            return hit
    return None


def _offline_error(arch, why: str = "it is unreachable from here"):
    return WeightsError(
        f"pretrained weights for {arch!r} need the Hugging Face hub ({why}) and no cached copy was found. Pass a "
        f"local timm checkpoint with weights=FILE (CLI: --weights FILE), or train from random initialisation with "
        f"pretrained=False (CLI: --no-pretrained).")


def create_backbone(arch: str, pretrained: bool = True, weights=None) -> nn.Module:
    """A timm model without classifier (`num_classes=0`) that returns pooled features.

    `weights` is a local timm checkpoint (.safetensors or a .pth/.bin state dict); without it and with
    `pretrained=True`, weights come from the hub, or its local cache when the hub is unreachable.
    """
    import timm

    check_arch(arch)
    kwargs = {}
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise WeightsError(f"weights file {weights} not found")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    elif pretrained and (why := _hub_unreachable()) is not None:
        cached = _cached_hub_file(arch)
        if cached is None:
            raise _offline_error(arch, why)
        kwargs["pretrained_cfg_overlay"] = dict(file=cached)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:  # state-dict key or shape mismatch, or a pickle that weights_only refused
        if weights is None:
            raise
        if "weights_only" in str(e):
            raise WeightsError(f"weights file {weights} holds pickled Python objects, not just tensors: refused, since "
                               "unpickling can run code. Use a .safetensors file or a plain state dict") from None
        raise WeightsError(f"weights file {weights} does not fit {arch!r}: {str(e).splitlines()[0][:300]}") from None
    except (OSError, ValueError) as e:
        if weights is not None:
            raise WeightsError(f"cannot read weights file {weights}: {e}") from None
        raise _offline_error(arch) from e


class SideDropout(nn.Module):
    "Dropout whose masks come from a `SideGenerator`, not torch's global generator."

    def __init__(self, p: float, side: SideGenerator):
        super().__init__()
        self.p, self.side = p, side

    def forward(self, x):
        if not self.training or not self.p:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.side(x.device))
        return x * keep / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


def shades_of_gray(x: torch.Tensor, p: int = 6, eps: float = 1e-6) -> torch.Tensor:
    """Shades of Gray colour constancy (Finlayson and Trezzi 2004) of images (N, 3, H, W) in [0, 1]: each image's
    illuminant is estimated as the Minkowski p-norm mean of each channel, and each channel is scaled so that
    illuminant becomes neutral grey (a white light leaves the image unchanged); values are clipped to [0, 1]. p = 1 is
    grey world, large p tends to max-RGB; 6 is what ISIC 2018-2019 entries used."""
    x = x.float().clamp(0, 1)
    light = x.pow(p).mean(dim=(2, 3), keepdim=True).pow(1.0 / p)  # (N, 3, 1, 1)
    light = light / (light.norm(dim=1, keepdim=True) + eps)  # unit length: white is (1, 1, 1) / sqrt(3)
    return (x / (light * 3 ** 0.5 + eps)).clamp(0, 1)


def _mlp_block(n_in, n_out, p, side=None):
    drop = nn.Dropout(p) if side is None else SideDropout(p, side)
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.SiLU(), drop]


class MelanomaModel(nn.Module):
    """timm backbone on the image, an MLP on the metadata vector, both concatenated into a dropout head; with
    `blank_flags`, also an image-only head for the rows that come without any patient field.

    With an image head the backbone learns only through that head: train such a model with `ImageHeadLoss` (as
    `melanoma_learner` does), or its backbone stays where it started."""

    def __init__(
        self,
        arch: str,  # any timm model name, e.g. "efficientnet_b3"
        n_meta: int = 0,  # width of the metadata vector; 0 for an image-only model
        n_out: int = 2,  # number of classes
        pretrained: bool = True,  # start from ImageNet weights
        weights=None,  # local timm checkpoint to load instead of the hub
        meta_sizes: tuple = (512, 128),  # hidden sizes of the metadata MLP
        meta_drop: float = 0.3,  # dropout inside the metadata MLP
        head_drop: float = 0.5,  # dropout before the final linear layer
        drop_samples: int = 5,  # multi-sample dropout: average of this many dropout masks while training
        mean=None,  # input normalisation; default the backbone's pretrained_cfg mean
        std=None,  # input normalisation; default the backbone's pretrained_cfg std
        blank_flags=None,  # indices of the patient fields' missing flags in the metadata vector: adds the image head
        color_constancy: int = 0,  # Shades of Gray colour constancy with this Minkowski p on every input image; 0: off
    ):
        super().__init__()
        self.backbone = create_backbone(arch, pretrained=pretrained, weights=weights)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = list(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
        std = list(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # pooled output width: after any pre-logits layer (e.g. MobileNetV3's conv_head), else num_features
        n_feat = n_image = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        # a row whose every patient field is missing goes to a head of its own that sees the image features alone
        blank_flags = [int(i) for i in blank_flags] if n_meta and blank_flags else None
        if blank_flags and not all(0 <= i < n_meta for i in blank_flags):
            raise MelafastError(f"blank_flags {blank_flags} fall outside the metadata vector (width {n_meta})")
        # built first, from the global generator: initialised as an image-only model's head is
        self.image_head = nn.Linear(n_image, n_out) if blank_flags else None
        if blank_flags:
            self.register_buffer("blank_flags", torch.tensor(blank_flags, dtype=torch.long), persistent=False)
        self.dropout = nn.Dropout(head_drop)
        self.side = self.joint_dropout = None
        if n_meta:
            # the metadata side draws from generators of its own (initialisation, dropout masks): the global stream,
            # and with it every random number of the image side, stays the one an image-only model would see
            self.side = SideGenerator(torch.initial_seed() + 1)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.side.seed)
                layers, n_in = [], n_meta
                for n_hidden in meta_sizes:
                    layers += _mlp_block(n_in, n_hidden, meta_drop, self.side)
                    n_in = n_hidden
                self.meta_mlp = nn.Sequential(*layers)
                n_feat += n_in
                self.head = nn.Linear(n_feat, n_out)
            self.joint_dropout = SideDropout(head_drop, self.side)
        else:
            self.meta_mlp = None
            self.head = nn.Linear(n_feat, n_out)
        self.image_logits = None  # the image head's logits of the last training batch, for `ImageHeadLoss`
        self.drop_samples = drop_samples
        self.channels_last = False  # set by the learner on GPUs: inputs are then converted too
        self.config = dict(arch=arch, n_meta=n_meta, n_out=n_out, meta_sizes=list(meta_sizes), meta_drop=meta_drop,
                           head_drop=head_drop, drop_samples=drop_samples, mean=mean, std=std)
        if blank_flags:  # only then: the config of an image-head-less model stays what older melafast reads
            self.config["blank_flags"] = blank_flags
        if color_constancy < 0:
            raise MelafastError(f"color_constancy is a Minkowski p (6) or 0 for off, got {color_constancy}")
        self.color_constancy = int(color_constancy)
        if self.color_constancy:  # only then, as for blank_flags
            self.config["color_constancy"] = self.color_constancy

    def forward(self, x, meta=None):
        return self.classify(self.image_features(x), meta)

    def image_features(self, x):
        """Pooled backbone features of a batch of images (N, 3, H, W) with values in [0, 1]. Colour constancy, when
        the model has it, is the first step: part of the model, so training, every prediction path and the exported
        ONNX graph apply the same one."""
        # fastai's tensor subclasses dispatch every op through Python; plain tensors keep the backbone fast
        x = x.as_subclass(torch.Tensor)
        if self.color_constancy:
            x = shades_of_gray(x, self.color_constancy).to(x.dtype)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def classify(self, feats, meta=None):
        """Class logits from image features and the metadata vector: what the model adds on top of the backbone.

        With an image head (`blank_flags`) the backbone learns from that head alone, as an image-only model's does:
        the joint head fuses the metadata onto the image features without back-propagating into them. The image
        head's logits of every row are kept in `image_logits` while training, for `ImageHeadLoss`; in eval mode,
        rows whose every patient field is missing take them, the others the joint head's."""
        image = feats
        if self.meta_mlp is not None:
            if meta is None:
                raise MelafastError("this model was built with metadata: call it with (images, meta)")
            meta = meta.as_subclass(torch.Tensor)
            # while training only: in eval mode gradients reach the features from both heads (Grad-CAM)
            shared = feats.detach() if self.image_head is not None and self.training else feats
            feats = torch.cat([shared, self.meta_mlp(meta.to(feats.dtype))], dim=1)
        out = self._head(self.head, feats, self.joint_dropout)
        if self.image_head is not None:
            alone = self._head(self.image_head, image)
            if self.training:
                self.image_logits = alone
            else:
                self.image_logits = None
                blank = (meta.index_select(1, self.blank_flags) > 0.5).all(dim=1, keepdim=True)  # no host sync
                out = torch.where(blank, alone.to(out.dtype), out)
        return out

    def _head(self, head, feats, dropout=None):
        dropout = dropout or self.dropout
        if self.training and self.drop_samples > 1:  # multi-sample dropout
            return torch.stack([head(dropout(feats)) for _ in range(self.drop_samples)]).mean(0)
        return head(dropout(feats))


def melanoma_splitter(model: MelanomaModel) -> list:
    """Two parameter groups: [backbone], [metadata MLP + heads]; `learn.freeze()` then trains only the second."""
    head = list(model.head.parameters())
    if model.image_head is not None:
        head += list(model.image_head.parameters())
    if model.meta_mlp is not None:
        head = list(model.meta_mlp.parameters()) + head
    return [list(model.backbone.parameters()), head]
