"""Why a model scores an image as it does: class-activation maps on the image, and what each patient field adds.

Grad-CAM comes from captum (`LayerGradCam`), which passes the metadata vector to the model as an additional forward
argument, so the image + metadata model needs no wrapper. The importance of the metadata reuses each image's
backbone features: blanking a field only reruns the metadata MLP and the heads, not the backbone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import MelafastError

__all__ = ["cam_layer", "describe_cam_layer", "grad_cam", "metadata_importance", "MIN_CAM_CELLS"]


def _cam_choice(model, size: int | None, min_cells: int):
    "(module, its name in the backbone, its stride or None) of the layer Grad-CAM looks at."
    info = getattr(model.backbone, "feature_info", None)
    if info:
        size = size or model.config.get("size") or 224
        fits = [f for f in info if size / f.get("reduction", 32) >= min_cells] or info[:1]
        return model.backbone.get_submodule(fits[-1]["module"]), fits[-1]["module"], fits[-1].get("reduction")
    convs = [(name, m) for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise MelafastError(f"Grad-CAM needs a convolutional backbone; {model.config['arch']} has no conv layer")
    return convs[-1][1], convs[-1][0], None


MIN_CAM_CELLS = 14  # the coarsest Grad-CAM grid shown: a lesion spans a few cells of it, not one


def cam_layer(model, size: int | None = None, min_cells: int = MIN_CAM_CELLS) -> torch.nn.Module:
    """Where Grad-CAM looks: the backbone's deepest feature stage whose map is at least `min_cells` wide for
    `size`-pixel images (stride 16 at 224-384 px, where the last stage's 7-12 cells would paint a lesion as one or
    two blobs; stride 32 from 448 px up)."""
    return _cam_choice(model, size, min_cells)[0]


def describe_cam_layer(model, size: int | None = None, min_cells: int = MIN_CAM_CELLS) -> str:
    """The layer `grad_cam` takes its maps at for `size`-pixel images, in words: its name and the grid of cells it
    sees, e.g. "backbone layer blocks.5 (stride 32: a 12 x 12 grid at 384 px)"."""
    size = size or 224
    _, name, stride = _cam_choice(model, size, min_cells)
    if stride is None:
        return f"backbone layer {name} (the last convolution)"
    cells = -(-size // stride)
    return f"backbone layer {name} (stride {stride}: a {cells} x {cells} grid at {size} px)"


def grad_cam(model, images: torch.Tensor, meta: torch.Tensor | None = None, pos: int = 1,
             normalize: bool = True) -> np.ndarray:
    """Grad-CAM heat maps of the melanoma output (class `pos`) for a batch of images (N, 3, H, W) in [0, 1]:
    an (N, H, W) array, each map scaled to [0, 1] (all zeros where nothing pushes towards melanoma); with
    `normalize=False` the maps as they are, so that maps of several images can share one colour scale."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    extra = (meta,) if meta is not None else None
    with torch.enable_grad():
        layer = cam_layer(model, images.shape[-1])
        attr = LayerGradCam(model, layer).attribute(images, target=pos, additional_forward_args=extra,
                                                    relu_attributions=True)
    if attr.ndim != 4:  # e.g. a vision transformer's token sequence: no spatial map to draw
        raise MelafastError(f"Grad-CAM needs spatial feature maps; {model.config['arch']} gives {tuple(attr.shape)}")
    maps = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    maps = maps.detach().float().cpu().numpy()
    if not normalize:
        return maps
    peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0.0)


def _melanoma_probs(predictor, feats, meta_table: pd.DataFrame, precision=None) -> np.ndarray:
    from ..inference import resolve_settings

    meta = torch.as_tensor(predictor.meta_proc.encode(meta_table), dtype=torch.float32, device=feats.device)
    with torch.inference_mode(), resolve_settings(predictor.spec, feats.device, precision).autocast():
        logits = predictor.model.classify(feats, meta).float()
    return torch.softmax(logits, dim=-1)[:, predictor.spec.pos].cpu().numpy()


def metadata_importance(predictors: dict, df: pd.DataFrame, bs: int = 64, num_workers: int | None = None,
                        device=None, progress: bool = True, precision: str | None = None) -> pd.DataFrame:
    """What each patient field adds, measured by blanking it: the path the model takes for a patient who comes
    without that field, which it was trained for (metadata dropout), on out-of-fold rows.

    `predictors` maps each fold to its model; `df` holds the OOF rows (`fold`, `target`, `fname` and the metadata
    columns). Each fold's model scores its own rows as they are, with one field blanked (a field and its
    patient-relative features together), and with every field blanked: the image path alone (the image head, where
    the run has one), the figure a patient without metadata gets. Plain view, no TTA; each model in the precision it
    was validated with, or `precision`. Shuffling a field among rows instead would feed the joint head values that
    contradict the image (a 20-year-old's age on an 80-year-old's lesion) and measure that confusion, not the field.
    Returns field, auc, drop (the AUC with every field given minus this one; negative: the model does better without
    the field) and what (in words).
    """
    from ..inference import default_device, image_features
    from ..metrics import auc

    device = torch.device(device) if device is not None else default_device()
    first = next(iter(predictors.values()))
    if first.meta_proc is None:
        raise MelafastError("this run does not use metadata (trained with --no-meta): nothing to blank")
    groups = first.meta_proc.field_groups()
    trials = {"all fields given": [], **{g[0]: g for g in groups},
              "every field blanked": [c for g in groups for c in g]}
    preds = {name: np.zeros(len(df)) for name in trials}
    for k, predictor in predictors.items():
        rows = np.flatnonzero(df["fold"].to_numpy() == k)
        part = df.iloc[rows].reset_index(drop=True)
        feats = image_features(predictor, part, bs=bs, num_workers=num_workers, device=device,
                               label=f"metadata importance, fold {k}", progress=progress, precision=precision)
        for name, cols in trials.items():
            table = part.copy()
            for c in cols:  # a hole, as the table would hold it
                table[c] = np.nan if c in predictor.meta_proc.cont_names else None
            preds[name][rows] = _melanoma_probs(predictor, feats, table, precision)
    target = df["target"].to_numpy()
    base = auc(target, preds["all fields given"])
    what = {"all fields given": "every field as the patient gave it",
            "every field blanked": "the image path alone: what a patient without metadata gets"}
    return pd.DataFrame([dict(field=name, auc=auc(target, p), drop=base - auc(target, p),
                              what=what.get(name, f"{name} missing" + (f" (with {', '.join(trials[name][1:])})"
                                                                       if len(trials[name]) > 1 else "")))
                         for name, p in preds.items()])
