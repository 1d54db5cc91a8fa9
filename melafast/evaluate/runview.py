"""A run folder read for its pages: the out-of-fold rows (checked), joined to their images and metadata as training
read them, and the fold models."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import DataError, RunError
from ..runfolder import RunFolder

__all__ = ["read_run", "oof_with_metadata", "fold_models"]


def read_run(run: RunFolder, page: str = "the report") -> tuple:
    "(the run's `RunInfo`, its out-of-fold rows), checked to hold both classes; `page` names who needs them."
    info = run.info()
    oof = run.oof(need=f"{page} is made from a run's out-of-fold predictions")
    if oof.empty or oof["target"].nunique() < 2:
        raise RunError(f"{run.oof_file} needs melanomas and benign lesions for an AUC")
    return info, oof


def oof_with_metadata(run: RunFolder, config, oof, data, images) -> tuple[pd.DataFrame, Path]:
    "The OOF rows with their images and metadata from the run's data folder (or `data`)."
    from ..data import add_meta_features, load_split
    from ..data.signatures import add_skin_tone
    from ..inference.inputs import clean_table

    data = run.data_for(data)
    train = load_split(data, "train", images=images)
    missing = oof.loc[~oof["image_name"].isin(train["image_name"]), "image_name"]
    if len(missing):
        raise DataError(f"{data} does not hold the images of {run.path}: {len(missing)} of its {len(oof)} out-of-fold "
                        f"images are not in its train.csv (e.g. {', '.join(missing.head(3))}); pass --data PATH")
    if config.settings.meta:  # the metadata read as training and predict read it (inference.inputs)
        cat, cont = config.metadata_columns
        train = clean_table(train, cat, cont, cont if config.settings.patient_features else ())
    if config.settings.extra_meta:
        train = add_meta_features(train)  # as in training: computed over the whole training table
    df = oof.merge(train.drop(columns=["target", "fold"], errors="ignore"), on="image_name", how="left")
    return add_skin_tone(df, progress=False), data


def fold_models(run: RunFolder) -> dict:
    "fold -> its loaded predictor."
    from ..inference import load_predictor

    models = {}
    for d in run.model_dirs():
        p = load_predictor(d)
        models[int((p.spec.fold if p.spec.fold is not None else len(models)))] = p
    return models
