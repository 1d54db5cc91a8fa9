"""A model folder written: the weights as `model.safetensors` and what rebuilds the model as `config.json`; no pickle.

`melafast.inference.checkpoint` reads these folders back.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..atomic import atomic_path, write_json
from ..record import CONFIG_FORMAT  # a model folder's config.json format (bumped there)
from ..runfolder import model_files

__all__ = ["save_model", "save_run"]


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
