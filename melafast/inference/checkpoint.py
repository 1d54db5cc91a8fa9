"""A saved model folder read back: the weights (`model.safetensors`, never a pickle) loaded strictly into the model
its `config.json` rebuilds. `melafast.train.save` writes these folders."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RunError
from ..runfolder import model_files

__all__ = ["load_model", "model_dirs"]


def _read_weights(path: Path) -> dict:
    weights = model_files(path)[0]
    try:
        if weights.suffix == ".safetensors" and weights.is_file():
            from safetensors.torch import load_file

            return load_file(str(weights))
        if weights.is_file():
            return torch.load(weights, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
        raise RunError(f"cannot read the weights in {path}: {str(e).splitlines()[0][:200]}") from None
    raise RunError(f"{path} has no {weights.name}: the run did not finish saving this model")


def load_model(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model saved in the model folder `path`, rebuilt from its config and loaded strictly, in eval mode; and the
    config."""
    from ..model import MelanomaModel
    from ..record import ModelSpec

    path = Path(path)
    spec = ModelSpec.read(model_files(path)[1])
    state = _read_weights(path)
    kw = {k: v for k, v in spec.model.items() if k != "arch"}
    try:
        model = MelanomaModel(spec.arch, pretrained=False, **kw)
        model.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as e:
        raise RunError(f"the weights in {path} do not fit its config ({spec.arch}): {str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval(), spec.raw


def model_dirs(run) -> list[Path]:
    """The model folders of a run: its `fold*/` subfolders, or the folder itself if it is one model."""
    from ..runfolder import RunFolder

    return RunFolder(run).model_dirs()
