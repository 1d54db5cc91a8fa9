"""A model folder: the weights as `model.safetensors` and what rebuilds the model as `config.json`; no pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_path, write_csv, write_json
from .errors import RunError
from .record import CONFIG_FORMAT  # a model folder's config.json format (bumped there)
from .runfolder import model_files

__all__ = ["save_run", "save_model", "load_model", "CONFIG_FORMAT", "atomic_path", "write_json", "write_csv",
           "load_predictor", "Predictor", "RunPredictor", "predict_many", "inference_settings", "model_dirs"]


def save_model(learn, path, extra: dict | None = None) -> Path:
    """Write `learn`'s model to the model folder `path`: its weights (safetensors) and the config that rebuilds it
    (architecture, image size, metadata preprocessing, classes, and what training resolved: precision, memory
    layout), plus `extra`."""
    from safetensors.torch import save_file

    from .averaging import unwrap
    from .learner import melanoma_index

    path = Path(path)
    model, dls = unwrap(learn.model), learn.dls
    vocab = [v.item() if hasattr(v, "item") else v for v in dls.vocab]
    config = dict(
        format=CONFIG_FORMAT, melafast_version=__version__, arch=model.config["arch"], size=int(dls.size),
        meta=model.meta_mlp is not None, meta_proc=dls.meta_proc.to_dict() if model.meta_mlp is not None else None,
        n_out=len(vocab), vocab=vocab, pos=melanoma_index(vocab), model=model.config,
        precision=getattr(learn, "precision", None), channels_last=bool(getattr(model, "channels_last", False)),
        **(extra or {}),
    )
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    weights, cfg_file = model_files(path)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "melafast", "arch": config["arch"]})
    write_json(config, cfg_file)
    return path


save_run = save_model  # its name before model folders and run folders had names of their own


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
    from .model import MelanomaModel
    from .record import ModelSpec

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
    from .runfolder import RunFolder

    return RunFolder(run).model_dirs()


# predicting moved to melafast.inference; these names stay importable from here
from .inference import Predictor, RunPredictor, inference_settings, load_predictor, predict_many  # noqa: E402
