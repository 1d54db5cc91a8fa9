"""Inference, one path for every prediction: device, precision, memory layout, determinism, TTA, streaming.

Out-of-fold predictions in training, `predict`, `submit`, `pseudo`, `report` (its feature and Grad-CAM passes) and
`learn.dihedral_tta` all come through here, so a change of precision, layout or TTA reaches each of them at once.
A saved model is predicted with the precision and memory layout its fold was validated with (recorded in its
config), wherever the device can run them; `precision=` overrides, and any difference is said, not hidden.
"""

from .settings import (Settings, default_device, inference_settings, record_nondeterminism,
                       resolve_precision, resolve_settings, set_determinism)
from .loop import image_features, model_batch, predict_many, predict_probs, predict_probs_multi
from .predictor import MissingMetadataWarning, Predictor, RunPredictor, load_predictor

__all__ = ["resolve_precision", "Settings", "resolve_settings", "inference_settings", "set_determinism",
           "record_nondeterminism", "predict_probs_multi", "predict_probs", "predict_many", "image_features",
           "model_batch", "Predictor", "RunPredictor", "load_predictor", "MissingMetadataWarning", "default_device"]
