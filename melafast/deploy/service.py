"""What `melafast serve` answers with, apart from HTTP: a run loaded once, an upload checked and decoded, and its
prediction (probability, decision, Grad-CAM) through the one prediction path (`inference`), as `predict` makes it."""

from __future__ import annotations

import base64
import io
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MelafastError

__all__ = ["Service", "TooLarge", "MAX_MB", "MAX_MEGAPIXELS", "THREADS", "READ_TIMEOUT"]

MAX_MB = 20  # default upload limit
MAX_MEGAPIXELS = 40.0  # default largest image, in millions of pixels (dermoscopes: up to about 24)
THREADS = 8  # default requests handled at once
READ_TIMEOUT = 30.0  # seconds a client may take to send its request
_ALIASES = {"age": "age_approx", "site": ("anatom_site_general_challenge", "anatom_site_general")}  # short names


class TooLarge(DataError):
    """An upload whose image is larger than the server takes."""


class Service:
    """What the server does with one upload: a run's fold models, one prediction at a time."""

    def __init__(self, run, device=None, precision: str | None = None, max_megapixels: float = MAX_MEGAPIXELS):
        from ..inference import load_predictor
        from ..inference.inputs import form_fields, upload_refusal
        from ..inference.settings import default_device

        predictor = load_predictor(run)
        self.run = Path(run)
        self.models = getattr(predictor, "predictors", [predictor])
        why = upload_refusal(self.models, "serve")
        if why:
            raise MelafastError(why)
        self.predictor, self.tta = predictor, predictor.tta
        self.point = getattr(predictor, "operating_point", None)
        self.recalibration = getattr(predictor, "recalibration", None)
        self.fields = form_fields(self.models)
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = precision
        self.max_pixels = int(max_megapixels * 1e6)
        self.lock = threading.Lock()
        try:  # the share of melanomas the models learnt from: what a probability at another prevalence moves from
            from ..inference.predict import training_prevalence

            self.trained_prevalence = training_prevalence(run)
        except MelafastError:
            self.trained_prevalence = None

    def info(self) -> dict:
        p = self.point
        return dict(run=self.run.resolve().name, models=len(self.models), tta=self.tta,
                    folds=[m.spec.fold for m in self.models], metadata=any(m.meta_proc for m in self.models),
                    fields=self.fields, max_megapixels=self.max_pixels / 1e6,
                    operating_point=None if p is None else
                    dict(operating_point=p.operating_point, goal=p.goal, threshold=p.threshold, rule=p.rule,
                         scale=p.scale, chosen_on=p.chosen_on, crossfit=p.crossfit, paths=p.paths),
                    recalibration=None if self.recalibration is None else self.recalibration.to_dict())

    def row(self, name: str, values: dict):
        """The one-row table of an upload: its name and the fields given (short names `age`, `site` allowed); a
        field the run does not know is an error naming the ones it does."""
        import pandas as pd

        known = {f["name"] for f in self.fields}
        row = {"image_name": name}
        for key, value in values.items():
            if value in ("", None):
                continue  # a field left empty is a hole, whatever its name
            alias = _ALIASES.get(key, key)
            column = next((c for c in ((alias,) if isinstance(alias, str) else alias) if c in known), None)
            if column is None:
                raise DataError(f"this run has no field {key!r}; its fields: {', '.join(sorted(known)) or 'none'}")
            row[column] = value
        return pd.DataFrame([row])

    def decode(self, data: bytes, name: str, sizes) -> dict:
        """The upload as each input size sees it, decoded once per size: size -> (1, 3, size, size) tensor in [0, 1].
        Its pixel count is checked from the header first."""
        from PIL import Image, UnidentifiedImageError

        from ..onnx import ExportError, open_image_array

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
                with Image.open(io.BytesIO(data)) as im:  # reads the header only
                    w, h = im.size
        except Image.DecompressionBombError:
            raise TooLarge(f"{name} is too large an image for this server (over {self.max_pixels / 1e6:.3g} "
                           "megapixels, --max-megapixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise DataError(f"{name} is not an image this server can read (JPEG, PNG, BMP, TIFF or WebP)") from None
        if w * h > self.max_pixels:
            raise TooLarge(f"{name} is {w} x {h} pixels ({w * h / 1e6:.1f} megapixels); this server takes images of up "
                           f"to {self.max_pixels / 1e6:.3g} megapixels (--max-megapixels)")
        try:
            return {size: torch.from_numpy(open_image_array(io.BytesIO(data), size))[None] for size in sorted(set(sizes))}
        except (ExportError, Image.DecompressionBombError) as e:
            raise DataError(f"{name}: {e}") from None

    def predict(self, data: bytes, name: str = "upload", prevalence: float | None = None, **values) -> dict:
        """The prediction for one image file's bytes with its (optional) patient fields, by column name: the fold
        mean, each fold model's probability, the metadata used (values never seen in training listed in `unseen`),
        with `prevalence` the probability where that share of lesions are melanomas, and the decision."""
        from ..data import MetaStack
        from ..evaluate.explain import grad_cam
        from ..inference.inputs import model_table
        from ..inference.loop import prepare_models, predict_probs_multi

        from ..inference.inputs import unseen_values

        if prevalence is not None and not 0 < prevalence < 1:
            raise DataError(f"prevalence must be between 0 and 1 (a share of melanomas, e.g. 0.02), got {prevalence}")
        if prevalence is not None and self.trained_prevalence is None and self.recalibration is None:
            raise DataError("this run does not record how many melanomas it trained on: no probability at another "
                            "prevalence")
        table = model_table(self.models, self.row(name, values))  # cleaned and checked as predict does
        images = self.decode(data, name, [p.spec.size for p in self.models])
        probs, maps = [None] * len(self.models), [None] * len(self.models)
        with self.lock:
            for size, img in images.items():
                idx = [i for i, p in enumerate(self.models) if p.spec.size == size]
                stack = MetaStack([self.models[i].meta_proc for i in idx])
                img = img.to(self.device)
                batch = (img, torch.stack([stack(r) for r in table.to_dict("records")]).to(self.device)) \
                    if stack.procs else (img,)
                settings = prepare_models([self.models[i] for i in idx], self.device, self.precision)
                out = predict_probs_multi([self.models[i].model for i in idx], [batch], stack.slices, n=self.tta,
                                          amp_dtype=[s.amp_dtype for s in settings], n_inp=len(batch), progress=False)
                for i, sl, s, pr in zip(idx, stack.slices, settings, out):
                    p = self.models[i]
                    probs[i] = float(pr[0, p.spec.pos])
                    meta = None if sl is None else batch[1][:, sl].as_subclass(torch.Tensor)
                    with s.autocast():
                        maps[i] = grad_cam(p.model, img, meta, p.spec.pos)[0]
            view = (img[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        given = {f["name"]: _plain(table[f["name"]].iloc[0]) for f in self.fields if f["name"] in table.columns}
        out = dict(image_name=name, pred=float(np.mean(probs)), per_model=probs, models=len(self.models), tta=self.tta,
                   folds=[m.spec.fold for m in self.models], metadata=given,
                   unseen={c: list(v) for c, v in unseen_values(self.models, table).items()},
                   trained_prevalence=self.trained_prevalence)
        from ..inference.probability import probability_columns

        extra = probability_columns([out["pred"]], self.recalibration, self.trained_prevalence, prevalence)
        out.update({k: float(v[0]) for k, v in extra.items()})
        if prevalence is not None:
            out["prevalence"] = prevalence
        if self.point is not None:
            decision, votes = self.point.decide([[p] for p in probs])
            out.update(decision=int(decision[0]), operating_point=self.point.goal, threshold=self.point.threshold,
                       rule=self.point.rule)
            if self.point.scale != "ensemble":  # the models' vote decides; on the fold mean, pred is the reason
                out["votes"] = int(votes[0])
        out["image_png"], out["cam_png"] = _png(view), _png(_overlay(view, np.mean(maps, axis=0)))
        return out


def _plain(v):
    "A table value as JSON: None for a hole, a float for a number, else the text."
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return float(v) if isinstance(v, (int, float, np.number)) else str(v)


def _overlay(img: np.ndarray, cam: np.ndarray) -> np.ndarray:
    "The map over the image: red where it raises the melanoma score."
    heat = np.zeros_like(img, dtype=np.float32)
    heat[..., 0] = 255
    alpha = 0.55 * cam[..., None]
    return (img * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).resize((224, 224), Image.NEAREST if pixels.shape[0] < 224 else Image.BILINEAR).save(
        buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
