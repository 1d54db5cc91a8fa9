"""Predictors: what `load_predictor` gives, a fold model or a run's fold ensemble with `.predict(images, meta)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import RunError
from .loop import say, predict_many

__all__ = ["Predictor", "RunPredictor", "load_predictor", "MissingMetadataWarning"]


class MissingMetadataWarning(UserWarning):
    """Images predicted without any patient metadata, through the model's missing-metadata path."""


def _no_metadata_note(predictors, table: pd.DataFrame, figures: dict) -> str | None:
    """What to tell a user whose images come without any patient metadata (rows of a `model_table` that the models
    route to their missing-metadata path), or None when all have some."""
    from .inputs import no_metadata

    procs = [p.meta_proc for p in predictors if p.meta_proc is not None]
    none = no_metadata(predictors, table)
    if not none.any():
        return None
    # what a user gives (sex, age, site, ...), not what melafast computes from the table and the files
    fields = list(dict.fromkeys(c for p in procs for c in p.given_columns))
    with_meta, without = figures.get("auc"), figures.get("auc_no_meta")
    scope = figures.get("scope", "out-of-fold")
    how = (f"it scored AUC {without:.4f} {scope} with every field blanked ({with_meta:.4f} with its metadata)"
           if with_meta is not None and without is not None else "its run did not record how it scores without metadata")
    dropout = figures.get("meta_dropout")
    if all(getattr(p.model, "image_head", None) is not None for p in predictors if p.meta_proc is not None):
        trained = ("an image-only head trained on every training image scores them"
                   + (" (metadata dropout {:.2f} too)".format(dropout) if dropout else ""))
    else:
        trained = ("it was trained for it (metadata dropout {:.2f})".format(dropout) if dropout else
                   "it learned that path only from the training rows that had holes (no metadata dropout)")
    return (f"{int(none.sum())} of {len(table)} images have no metadata ({', '.join(fields)}): they are predicted through "
            f"the model's missing-metadata path; {trained}; {how}")


@dataclass
class Predictor:
    """A trained melanoma model, ready to predict new images (a folder, paths, or a DataFrame with `fname`)."""

    model: torch.nn.Module  # the rebuilt MelanomaModel, in eval mode
    config: dict  # the fold's config.json, as read

    def __post_init__(self):
        from ..record import ModelSpec

        self.spec = ModelSpec.from_config(self.config)  # the typed record every surface reads
        self.meta_proc = self.spec.meta_processor  # the fitted metadata encoding (None for an image-only model)

    @property
    def tta(self) -> int:
        """The dihedral TTA the run scored this model with (8 for models saved before it was recorded)."""
        return int(self.spec.tta)

    @property
    def figures(self) -> dict:
        s = self.spec
        scope = "on its validation fold" + (", at the epoch chosen on it (optimistic)" if s.keep == "best" else "")
        return dict(auc=s.valid_auc, auc_no_meta=s.valid_auc_no_meta, meta_dropout=s.meta_dropout, scope=scope)

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True, precision: str | None = None, log=None) -> np.ndarray:
        """Melanoma probability of each image, in order, averaged over `tta` dihedral views (default: the run's).

        `images`: a folder, an image path, a list of paths, or a DataFrame with `fname` (see `image_table`);
        `meta`: a CSV or DataFrame of metadata by `image_name` (images it does not cover count as unknown; when
        some have no metadata at all, `log` is told, or a `MissingMetadataWarning` raised, with how the model does
        on that path). `precision` overrides the precision the model was validated with.
        """
        return predict_rows([self], self.figures, images, meta, tta or self.tta, bs, num_workers, device, progress,
                        precision, log)[0]


@dataclass
class RunPredictor:
    """Every fold model of a run as one predictor: the mean of their melanoma probabilities, as `submit` blends them."""

    predictors: list  # one `Predictor` per fold model
    path: Path  # the run folder
    tta: int = 8  # the dihedral TTA the run was made with
    figures: dict | None = None  # the run's OOF AUC with and without metadata, and its metadata dropout
    operating_point: object = None  # the run's saved `OperatingPoint` (`melafast report --operating-point`), if any
    recalibration: object = None  # the run's saved `Recalibration` (`melafast recalibrate`), if any

    def predict(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                device=None, progress: bool = True, precision: str | None = None, log=None) -> np.ndarray:
        """Melanoma probability of each image: the fold models' mean (arguments as `Predictor.predict`)."""
        preds = predict_rows(self.predictors, self.figures or {}, images, meta, tta or self.tta, bs, num_workers, device,
                         progress, precision, log)
        return np.mean(preds, axis=0)

    def predict_frame(self, images, meta=None, tta: int | None = None, bs: int = 64, num_workers: int | None = None,
                      device=None, progress: bool = True, precision: str | None = None, log=None) -> pd.DataFrame:
        """A table of image_name, pred (the fold models' mean probability), `pred_calibrated` when the run has a
        recalibration (`melafast recalibrate`) and, when the run has a saved operating point, `decision` (1: melanoma)
        and, when the decision is the fold models' vote, `votes` (the models at or above its threshold; a point
        chosen on the fold mean decides by `pred` itself): see `decide`."""
        from ..data import image_table
        from .probability import probability_columns

        df = image_table(images, meta)
        preds = predict_rows(self.predictors, self.figures or {}, df, None, tta or self.tta, bs, num_workers, device,
                         progress, precision, log)
        out = pd.DataFrame({"image_name": df["image_name"].to_numpy(), "pred": np.mean(preds, axis=0)})
        for name, values in probability_columns(out["pred"], self.recalibration).items():
            out[name] = values
        if self.operating_point is not None:
            out["decision"], votes = self.decide(preds, tta=tta, precision=precision, log=log)
            if self.operating_point.scale != "ensemble":
                out["votes"] = votes
        return out

    def decide(self, per_model, tta: int | None = None, precision: str | None = None, log=None):
        """(decision, votes) from each fold model's probabilities, by the saved operating point's rule (see
        `operating.decide`): chosen on out-of-fold scores, each model compared with the threshold on the scale it
        was chosen on (one model's scores, not the fold mean), melanoma when at least half say so; chosen on a
        calibration set, the fold mean against it. `log` (or a warning) is told when `tta`/`precision` differ from
        what chose it."""
        point = self.operating_point
        if point is None:
            raise RunError(f"{self.path} has no saved operating point: choose one with `melafast report --run "
                           f"{self.path} --operating-point sens90` (or spec95, or a threshold)")
        if len(per_model) != len(self.predictors):
            raise ValueError(f"decide needs one prediction array per fold model ({len(self.predictors)}), "
                             f"got {len(per_model)}")
        if (tta and tta != point.tta) or precision:
            say(f"the operating point {point.operating_point} was chosen on scores made with TTA "
                 f"x{point.tta} in each model's validated precision; these use "
                 f"{'TTA x' + str(tta) if tta else 'the same TTA'}{', precision ' + precision if precision else ''}: "
                 "its figures may not hold", log, UserWarning, stacklevel=3)
        return point.decide(per_model)


def predict_rows(predictors, figures, images, meta, tta, bs, num_workers, device, progress, precision, log) -> list:
    from ..data import image_table
    from .inputs import model_table, unseen_note, unseen_values

    table = model_table(predictors, image_table(images, meta))
    unseen = unseen_note(unseen_values(predictors, table))
    if unseen:
        say(unseen, log, UserWarning, stacklevel=4)
    note = _no_metadata_note(predictors, table, figures)
    if note:
        say(note, log, MissingMetadataWarning, stacklevel=4)  # at the line that called .predict
    return predict_many(predictors, table, tta=tta, bs=bs, num_workers=num_workers, device=device, progress=progress,
                        precision=precision, log=log, prepared=True)


def load_predictor(path, device="cpu"):
    """Rebuild saved models from their two files each (safetensors + JSON; no pickle is ever opened).

    A fold folder gives a `Predictor`; a run folder gives a `RunPredictor` over all its fold models, which
    predicts with the run's TTA. Both have `.predict(images, meta=None)`.
    """
    from .checkpoint import load_model
    from ..runfolder import RunFolder

    run = RunFolder(path)
    if run.is_single_model():  # one model's folder (a broken one says what is wrong with it)
        run.require()
        return Predictor(*load_model(run.path, device))
    if run.config_file.is_file():
        run.config()  # a run folder of a newer format stops here, naming the version
    predictors = [Predictor(*load_model(d, device)) for d in run.model_dirs()]
    res = run.figures()
    dropout = run.train_config().meta_dropout if run.config_file.is_file() else None
    # the figures of the models saved: with --keep best the kept epochs', chosen on the rows they score
    chosen = res.oof_auc_selected is not None
    figures = dict(auc=res.saved_auc, auc_no_meta=res.oof_auc_no_meta, meta_dropout=dropout,
                   scope="out-of-fold, at the epochs kept on those rows (optimistic)" if chosen else "out-of-fold")
    return RunPredictor(predictors, run.path, run.tta, figures, run.operating_point(), run.recalibration())

