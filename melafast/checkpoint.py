"""Save a trained model as `model.safetensors` + `config.json`, and load it back without pickle."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .errors import RunError

__all__ = ["predict_many", "save_run", "load_predictor", "Predictor", "atomic_path", "write_json", "write_csv", "CONFIG_FORMAT"]

CONFIG_FORMAT = 1  # bump when config.json changes incompatibly
_REQUIRED = {"format": int, "arch": str, "size": int, "meta": bool, "n_out": int, "pos": int, "vocab": list, "model": dict}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; the result should look like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path):
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(df: pd.DataFrame, path):
    """Write `df` as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_run(learn, path, extra: dict | None = None) -> Path:
    """Write `learn`'s model to `path/model.safetensors` and what rebuilds it to `path/config.json`."""
    from safetensors.torch import save_file

    from .learner import melanoma_index

    path = Path(path)
    model, dls = learn.model, learn.dls
    vocab = [v.item() if hasattr(v, "item") else v for v in dls.vocab]
    config = dict(
        format=CONFIG_FORMAT, melafast_version=__version__, arch=model.config["arch"], size=int(dls.size),
        meta=model.meta_mlp is not None, meta_proc=dls.meta_proc.to_dict() if model.meta_mlp is not None else None,
        n_out=len(vocab), vocab=vocab, pos=melanoma_index(vocab), model=model.config,
        **(extra or {}),
    )
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "melafast", "arch": config["arch"]})
    write_json(config, path / "config.json")
    return path


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise RunError(f"{path} is not a melafast model folder: config.json is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{cfg_file} is not valid JSON ({e}); the run may have been interrupted: train it again") from None
    if not isinstance(cfg, dict):
        raise RunError(f"{cfg_file} does not hold a melafast model config")
    for key, typ in _REQUIRED.items():
        if not isinstance(cfg.get(key), typ):
            raise RunError(f"{cfg_file}: field {key!r} is missing or not a {typ.__name__}")
    if cfg["format"] > CONFIG_FORMAT:
        raise RunError(f"{cfg_file} was written by melafast {cfg.get('melafast_version', '?')} (format {cfg['format']}); "
                       f"this melafast {__version__} reads format {CONFIG_FORMAT} or older: upgrade melafast")
    return cfg


def _read_weights(path: Path) -> dict:
    st, pth = path / "model.safetensors", path / "model.pth"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pth.is_file():
            return torch.load(pth, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
        raise RunError(f"cannot read the weights in {path}: {str(e).splitlines()[0][:200]}") from None
    raise RunError(f"{path} has no model.safetensors: the run did not finish saving this model")


@dataclass
class Predictor:
    """A trained melanoma model, ready to predict on new images (a DataFrame with `fname` and metadata)."""

    model: torch.nn.Module  # the rebuilt MelanomaModel, in eval mode
    config: dict  # the run's config.json

    @property
    def meta_proc(self):
        from .data import MetaProcessor

        return MetaProcessor.from_dict(self.config["meta_proc"]) if self.config["meta"] else None

    def predict(self, df: pd.DataFrame, tta: int = 8, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True) -> np.ndarray:
        """Melanoma probabilities for the rows of `df`, in order, averaged over `tta` dihedral views."""
        return predict_many([self], df, tta=tta, bs=bs, num_workers=num_workers, device=device, progress=progress)[0]


def predict_many(predictors: list, df: pd.DataFrame, tta: int = 8, bs: int = 64, num_workers: int | None = None,
                 device=None, progress: bool = True) -> list:
    """Melanoma probabilities of every predictor for the rows of `df` (one array each), decoding each image once
    per input size rather than once per model: the fold models of a run share one pass over the images."""
    from .data import EXTRA_CONT_NAMES, MetaStack, add_meta_features, clean_metadata, inference_dl
    from .tta import predict_probs_multi

    procs = [p.meta_proc for p in predictors]
    if any(c in EXTRA_CONT_NAMES and c not in df.columns for proc in procs if proc is not None for c in proc.cont_names):
        df = add_meta_features(df)  # the models were trained with them: compute them over this table
    df = clean_metadata(df)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    out = [None] * len(predictors)
    for size in sorted({p.config["size"] for p in predictors}):
        idx = [i for i, p in enumerate(predictors) if p.config["size"] == size]
        stack = MetaStack([procs[i] for i in idx])
        dl = inference_dl(df, size, stack if stack.procs else None, bs=bs, num_workers=num_workers, device=device)
        models = [predictors[i].model.to(device) for i in idx]
        probs = predict_probs_multi(models, dl, stack.slices, n=tta, amp_dtype=amp, progress=progress)
        for i, pr in zip(idx, probs):
            out[i] = pr[:, predictors[i].config["pos"]].numpy().astype(np.float64)
    return out


def load_predictor(path, device="cpu") -> Predictor:
    """Rebuild a model saved by `save_run` from its two files (safetensors + JSON; no pickle is ever opened)."""
    from .model import MelanomaModel

    path = Path(path)
    cfg = _read_config(path)
    state = _read_weights(path)
    kw = {k: v for k, v in cfg["model"].items() if k != "arch"}
    try:
        model = MelanomaModel(cfg["arch"], pretrained=False, **kw)
        model.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as e:
        raise RunError(f"the weights in {path} do not fit its config ({cfg['arch']}): {str(e).splitlines()[0][:200]}") from None
    return Predictor(model.to(device).eval(), cfg)
