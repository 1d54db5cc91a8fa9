"""A Kaggle submission: predict the test split with every fold of every run, blend, write and validate it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..config import BLENDS
from ..errors import DataError, MelafastError
from ..runfolder import RunFolder
from .predict import fill_unusable, model_preds, predict_usable, usable_rows
from .tta import dihedral_views

__all__ = ["submission_ids", "submission_id_column", "write_submission", "validate_submission", "make_submission"]


def submission_ids(data) -> list[str]:
    """Image ids a submission must list, in order: those of sample_submission.csv, else of test.csv (or the ISIC
    2024 layout's test-metadata.csv)."""
    from ..data import read_table
    from ..layout import split_csv

    data = Path(data)
    for csv in (data / "sample_submission.csv", split_csv(data, "test")):
        if csv.is_file():
            return read_table(csv)["image_name"].tolist()
    raise DataError(f"{data} has neither sample_submission.csv nor test.csv: nothing to submit for")


def submission_id_column(data) -> str:
    "The id column's name a submission for `data` must use: sample_submission.csv's (ISIC 2024: isic_id)."
    template = Path(data) / "sample_submission.csv"
    if template.is_file():
        with open(template, encoding="utf-8") as f:
            first = f.readline().strip().split(",")[0].strip()
        if first == "isic_id":
            return first
    return "image_name"


def validate_submission(path, ids, id_column: str = "image_name") -> None:
    """Raise `DataError` unless `path` is `<id_column>,target` with exactly `ids`, in order, targets in [0, 1]."""
    path = Path(path)
    try:
        sub = pd.read_csv(path, dtype={id_column: str})
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise DataError(f"submission {path} is not a readable CSV ({e})") from None
    if list(sub.columns) != [id_column, "target"]:
        raise DataError(f"submission {path} must have the columns {id_column},target; it has {','.join(sub.columns)}")
    got, want = sub[id_column].tolist(), list(ids)
    if got != want:
        missing, extra = set(want) - set(got), set(got) - set(want)
        raise DataError(f"submission {path} ids differ from the expected {len(want)}: {len(missing)} missing, "
                        f"{len(extra)} extra{', order differs' if not (missing or extra) else ''}")
    t = pd.to_numeric(sub["target"], errors="coerce")
    if t.isna().any():
        raise DataError(f"submission {path} has {int(t.isna().sum())} missing or non-numeric targets")
    if ((t < 0) | (t > 1)).any():
        raise DataError(f"submission {path} has targets outside [0, 1]")


def write_submission(ids, preds, path, id_column: str = "image_name") -> Path:
    """Write `<id_column>,target` (image_name, or ISIC 2024's isic_id) atomically and validate it."""
    from ..atomic import atomic_path

    path = Path(path)
    sub = pd.DataFrame({id_column: list(ids), "target": np.clip(np.asarray(preds, dtype=np.float64), 0, 1)})
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False)
        validate_submission(tmp, ids, id_column)
    return path


def make_submission(runs, data=None, tta: int | None = None, blend_method: str = "mean", out="submission.csv",
                    bs: int = 64, num_workers: int | None = None, images=None, on_bad_image: str = "error",
                    weights=None, log: Callable = print, precision: str | None = None, stack: bool = False) -> Path:
    """Predict the test set with every fold of every run, blend, write and validate `out`. `stack=True` (one run):
    the run's stacked trees (`melafast stack`) on the test table and each fold model's image scores instead.

    A test image that cannot be read stops with an error, or with `on_bad_image="skip"` gets the median
    prediction (a submission must list every id).
    """
    from ..data import load_split

    if not runs:
        raise MelafastError("name at least one run folder (--run DIR)")
    if tta is not None:
        dihedral_views(tta)
    if blend_method not in BLENDS:
        raise MelafastError(f"--blend must be one of {', '.join(BLENDS)}, got {blend_method!r}")
    if weights is not None and len(weights) != len(runs):
        raise MelafastError(f"{len(weights)} blend weights for {len(runs)} runs")
    for r in runs:
        RunFolder(r).model_dirs()  # fail on a bad run before any prediction starts
    if stack and len(runs) != 1:
        raise MelafastError("--stack goes with one --run: the run `melafast stack` was fitted on")
    data = RunFolder(runs[0]).data_for(data)
    test = load_split(data, "test", images=images)  # the training images need not be there
    if test is None:
        raise DataError(f"{data} has no test.csv (nor test-metadata.csv): nothing to predict for a submission")
    ids = submission_ids(data)
    test = test.set_index("image_name", drop=False)
    absent = [i for i in ids if i not in test.index]
    if absent:
        raise DataError(f"{len(absent)} ids of the submission template are not in test.csv, e.g. {', '.join(absent[:3])}")
    test = test.loc[ids].reset_index(drop=True)
    ready = None
    if stack:  # everything the stack needs, checked before any image is scored
        from .stack import stack_ready

        ready = stack_ready(runs[0], data, log=log)
    ok = usable_rows(test, on_bad_image, log)
    if stack:
        final = _stacked(runs, test, ok, data, tta, bs, num_workers, log, precision, ready)
    else:
        final = predict_usable(runs, test, ok, tta, bs, num_workers, blend_method, log, weights, precision)
    path = write_submission(ids, final, out, submission_id_column(data))
    log(f"wrote {path}: {len(ids)} rows from {sum(len(RunFolder(r).model_dirs()) for r in runs)} model(s) in {len(runs)} run(s), "
        f"blend {blend_method}, TTA {f'x{tta}' if tta else 'as each run was made'}; validated")
    return path


def _stacked(runs, test, ok, data, tta, bs, num_workers, log, precision, ready) -> np.ndarray:
    "The stacked predictions of one run's test rows (unusable images: the median)."
    from .stack import stack_predict

    predictor, preds = model_preds(runs[0], test[ok], tta, bs, num_workers, None, log, precision)
    folds = [int((m.spec.fold if m.spec.fold is not None else i)) for i, m in enumerate(getattr(predictor, "predictors", [predictor]))]
    out = fill_unusable(stack_predict(runs[0], test[ok].reset_index(drop=True), dict(zip(folds, preds)), data, ready), ok)
    log(f"stacked: the trees of {runs[0]} on the test table and each fold model's image scores")
    return out
