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

__all__ = ["predict_many", "save_run", "load_predictor", "Predictor", "RunPredictor", "model_dirs", "inference_settings",
           "atomic_path", "write_json", "write_csv", "CONFIG_FORMAT"]

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


def inference_settings(model, device, precision: str = "auto", channels_last: bool | None = None):
    """Put `model` on `device` in eval mode with the speed settings training uses there; return the autocast dtype.

    `channels_last` (default: on GPUs) stores the weights and feeds the images channels-last; `precision` is
    resolved as in training (auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU). On GPUs cuDNN
    autotunes its kernels unless deterministic algorithms were asked for.
    """
    from .learner import resolve_precision

    device = torch.device(device)
    cuda = device.type == "cuda"
    channels_last = cuda if channels_last is None else channels_last
    model.to(device).eval()
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.channels_last = channels_last
    if cuda and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))


@dataclass
class Predictor:
    """A trained melanoma model, ready to predict new images (a folder, paths, or a DataFrame with `fname`)."""

    model: torch.nn.Module  # the rebuilt MelanomaModel, in eval mode
    config: dict  # the fold's config.json

    @property
    def meta_proc(self):
        from .data import MetaProcessor

        return MetaProcessor.from_dict(self.config["meta_proc"]) if self.config["meta"] else None

    @property
    def tta(self) -> int:
        """The dihedral TTA the run scored this model with (8 for models saved before it was recorded)."""
        return int(self.config.get("tta", 8))

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True) -> np.ndarray:
        """Melanoma probability of each image, in order, averaged over `tta` dihedral views (default: the run's).

        `images`: a folder, an image path, a list of paths, or a DataFrame with `fname` (see `image_table`);
        `meta`: a CSV or DataFrame of metadata by `image_name` (images it does not cover count as unknown).
        """
        from .data import image_table

        return predict_many([self], image_table(images, meta), tta=tta or self.tta, bs=bs, num_workers=num_workers,
                            device=device, progress=progress)[0]


@dataclass
class RunPredictor:
    """Every fold model of a run as one predictor: the mean of their melanoma probabilities, as `submit` blends them."""

    predictors: list  # one `Predictor` per fold model
    path: Path  # the run folder
    tta: int = 8  # the dihedral TTA the run was made with

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True) -> np.ndarray:
        """Melanoma probability of each image: the fold models' mean (arguments as `Predictor.predict`)."""
        from .data import image_table

        preds = predict_many(self.predictors, image_table(images, meta), tta=tta or self.tta, bs=bs,
                             num_workers=num_workers, device=device, progress=progress)
        return np.mean(preds, axis=0)


def model_dirs(run) -> list[Path]:
    """The model folders of a run: its `fold*/` subfolders, or the folder itself if it is one model."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run folder {run} does not exist")
    if (run / "model.safetensors").is_file() or (run / "model.pth").is_file():
        return [run]
    dirs = sorted((d for d in run.glob("fold*") if d.is_dir()), key=lambda d: d.name)
    done = [d for d in dirs if (d / "config.json").is_file()]
    if not done:
        raise RunError(f"{run} holds no trained model (no fold*/config.json): has `melafast train` finished a fold?")
    return done


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
    out = [None] * len(predictors)
    for size in sorted({p.config["size"] for p in predictors}):
        idx = [i for i, p in enumerate(predictors) if p.config["size"] == size]
        stack = MetaStack([procs[i] for i in idx])
        dl = inference_dl(df, size, stack if stack.procs else None, bs=bs, num_workers=num_workers, device=device)
        models = [predictors[i].model for i in idx]
        for m in models:
            amp = inference_settings(m, device)  # the same rule for every model, so one autocast dtype
        probs = predict_probs_multi(models, dl, stack.slices, n=tta, amp_dtype=amp, progress=progress)
        for i, pr in zip(idx, probs):
            out[i] = pr[:, predictors[i].config["pos"]].numpy().astype(np.float64)
    return out


def load_predictor(path, device="cpu"):
    """Rebuild saved models from their two files each (safetensors + JSON; no pickle is ever opened).

    A fold folder gives a `Predictor`; a run folder gives a `RunPredictor` over all its fold models, which
    predicts with the run's TTA. Both have `.predict(images, meta=None)`.
    """
    path = Path(path)
    if not any(path.glob("fold*/config.json")):  # one model's folder (a broken one says what is wrong with it)
        if not path.is_dir():
            raise RunError(f"run folder {path} does not exist")
        return _load_one(path, device)
    dirs = model_dirs(path)
    tta = 8
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        tta = int(json.loads((path / "config.json").read_text())["settings"]["tta"])
    return RunPredictor([_load_one(d, device) for d in dirs], path, tta)


def _load_one(path: Path, device="cpu") -> Predictor:
    from .model import MelanomaModel

    cfg = _read_config(path)
    state = _read_weights(path)
    kw = {k: v for k, v in cfg["model"].items() if k != "arch"}
    try:
        model = MelanomaModel(cfg["arch"], pretrained=False, **kw)
        model.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as e:
        raise RunError(f"the weights in {path} do not fit its config ({cfg['arch']}): {str(e).splitlines()[0][:200]}") from None
    return Predictor(model.to(device).eval(), cfg)
