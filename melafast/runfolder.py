"""The run folder: one object knows its layout, reads and atomically writes each of its files, finds its fold models
and the data it was trained on, and checks that it is complete and of a format this melafast reads.

    config.json         settings, data folder, counts, library versions, run format
    results.json        the cross-validated figures
    oof.csv             out-of-fold predictions
    metrics.csv         per fold and epoch: losses, AUC, seconds
    curves.png roc.png  training curves, out-of-fold ROC
    skipped_images.csv  images left out with --on-bad-image skip
    fold<k>/            one model folder per fold: model.safetensors + config.json [+ lr_find.png]
    report.html report_figures/              after `melafast report`
    threshold.json      the operating point `predict` decides with, after `melafast report --operating-point`
    audit.html audit.csv audit_figures/      after `melafast audit` (the report's audit table: report_figures/audit.csv)
    MODEL_CARD.md       after `melafast card`
    pseudo.csv pseudo.png pseudo.json        after `melafast pseudo`

No other module spells these names: they ask a `RunFolder` (or, for one model folder, `model_files`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .atomic import write_csv, write_json
from .errors import DataError, MelafastError, RunError
from .layout import missing_tables

__all__ = ["RunFolder", "RUN_FORMAT", "MODEL_WEIGHTS", "MODEL_CONFIG", "model_files", "is_model_dir"]

RUN_FORMAT = 2  # 2: folds record precision and memory layout, results the OOF AUC without metadata; 1: before
MODEL_WEIGHTS = "model.safetensors"  # a model folder's weights (safetensors: no pickle)
MODEL_CONFIG = "config.json"  # a model folder's config: what rebuilds the model and its inputs
_LEGACY_WEIGHTS = "model.pth"  # a plain state dict, read with weights_only=True


def model_files(path) -> tuple[Path, Path]:
    """The weights file and config file of the model folder `path` (a `.pth` state dict when no safetensors)."""
    path = Path(path)
    weights = path / MODEL_WEIGHTS
    if not weights.is_file() and (path / _LEGACY_WEIGHTS).is_file():
        weights = path / _LEGACY_WEIGHTS
    return weights, path / MODEL_CONFIG


def is_model_dir(path) -> bool:
    """True when `path` holds one model's weights (a fold folder, or a copy of one)."""
    return model_files(path)[0].is_file()


class RunFolder:
    """A run folder of `melafast train`: its paths, its files read and written (atomically), its fold models."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self):
        return str(self.path)

    # ----------------------------------------------------------------------------------------------
    # Layout

    config_file = property(lambda self: self.path / "config.json")
    results_file = property(lambda self: self.path / "results.json")
    oof_file = property(lambda self: self.path / "oof.csv")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    curves_file = property(lambda self: self.path / "curves.png")
    roc_file = property(lambda self: self.path / "roc.png")
    skipped_file = property(lambda self: self.path / "skipped_images.csv")
    report_file = property(lambda self: self.path / "report.html")
    operating_point_file = property(lambda self: self.path / "threshold.json")
    recalibration_file = property(lambda self: self.path / "recalibration.json")  # after `melafast recalibrate`
    audit_file = property(lambda self: self.path / "audit.csv")
    stack_file = property(lambda self: self.path / "stack.json")  # after `melafast stack`
    pseudo_file = property(lambda self: self.path / "pseudo.csv")

    def fold_dir(self, k: int) -> Path:
        """The model folder of fold `k`."""
        return self.path / f"fold{k}"

    def lr_find_file(self, k: int) -> Path:
        """fastai's lr_find plot of fold `k` (with --lr auto)."""
        return self.fold_dir(k) / "lr_find.png"

    def lr_find_files(self) -> list[Path]:
        return sorted(self.path.glob("fold*/lr_find.png"))

    @staticmethod
    def pseudo_info_file(pseudo_csv) -> Path:
        """The JSON beside a pseudo-label CSV: which run made it, with which folds."""
        return Path(pseudo_csv).with_suffix(".json")

    @staticmethod
    def pseudo_info(pseudo_csv) -> dict:
        """What the JSON beside a pseudo-label CSV says ({} for tables written before it existed)."""
        f = RunFolder.pseudo_info_file(pseudo_csv)
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except ValueError as e:
            raise RunError(f"{f} is damaged ({e}): make the pseudo-labels again with `melafast pseudo`") from None

    @staticmethod
    def write_pseudo_info(pseudo_csv, info: dict):
        write_json(info, RunFolder.pseudo_info_file(pseudo_csv))

    # ----------------------------------------------------------------------------------------------
    # Checks

    def require(self) -> "RunFolder":
        """Raise `RunError` unless the folder exists."""
        if not self.path.is_dir():
            raise RunError(f"run folder {self.path} does not exist")
        return self

    def model_dirs(self) -> list[Path]:
        """The model folders of the run: its finished `fold<k>/` folders, or the folder itself if it is one model."""
        self.require()
        if is_model_dir(self.path):
            return [self.path]
        dirs = sorted((d for d in self.path.glob("fold*") if d.is_dir()), key=lambda d: d.name)
        done = [d for d in dirs if (d / MODEL_CONFIG).is_file()]
        if not done:
            raise RunError(f"{self.path} holds no trained model (no fold*/{MODEL_CONFIG}): has `melafast train` "
                           "finished a fold?")
        return done

    def unfinished_folds(self) -> list[int]:
        """The folds the run's settings ask for that have no saved model (an interrupted run); [] for one model."""
        if self.is_single_model() or not self.config_file.is_file():
            return []
        s = self.settings
        wanted = [s["fold"]] if s.get("fold") is not None else range(int(s.get("folds", 0)))
        return [k for k in wanted if not (is_model_dir(self.fold_dir(k)) and (self.fold_dir(k) / MODEL_CONFIG).is_file())]

    def is_single_model(self) -> bool:
        """True when the folder is one model's folder rather than a run of fold models."""
        return not any(self.path.glob(f"fold*/{MODEL_CONFIG}"))

    # ----------------------------------------------------------------------------------------------
    # Reading

    def config(self) -> dict:
        """The run's config.json, checked: it exists, is JSON, and is of a run format this melafast reads."""
        try:
            cfg = json.loads(self.config_file.read_text())
        except FileNotFoundError:
            raise RunError(f"{self.path} is not a melafast run folder: {self.config_file.name} is missing") from None
        except (OSError, ValueError) as e:
            raise RunError(f"{self.config_file} is damaged ({e}); the run may have been interrupted") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("settings"), dict):
            raise RunError(f"{self.config_file} does not hold a melafast run config")
        fmt = cfg.get("format", 1)  # runs written before the format was recorded are format 1
        if not isinstance(fmt, int) or fmt > RUN_FORMAT:
            from . import __version__

            raise RunError(f"{self.path} was written by melafast {cfg.get('versions', {}).get('melafast', '?')} (run "
                           f"format {fmt}); this melafast {__version__} reads run formats 1 to {RUN_FORMAT}: upgrade "
                           "melafast")
        return cfg

    @property
    def format(self) -> int:
        return self.config().get("format", 1)

    @property
    def settings(self) -> dict:
        """The training settings the run was made with."""
        return self.config()["settings"]

    @property
    def data(self) -> Path | None:
        """The dataset folder the run was trained on (None when its config does not say)."""
        try:
            data = json.loads(self.config_file.read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            return None
        return Path(data) if isinstance(data, str) else None

    def data_for(self, data=None) -> Path:
        """`data` if given, else the dataset folder the run was trained on; an error when neither is known."""
        data = Path(data) if data is not None else self.data
        if data is None:
            raise RunError(f"{self.path} does not record its dataset: pass --data PATH")
        return data

    @property
    def tta(self) -> int:
        """The dihedral TTA the run scored its out-of-fold predictions with (8 when not recorded)."""
        try:
            return int(self.train_config().tta)
        except (MelafastError, OSError, ValueError, TypeError):
            return 8

    def results(self) -> dict:
        """results.json ({} when the run has not finished)."""
        if not self.results_file.is_file():
            return {}
        try:
            return json.loads(self.results_file.read_text())
        except ValueError as e:
            raise RunError(f"{self.results_file} is damaged ({e})") from None

    def figures(self):
        """results.json as a typed `RunFigures` (every figure None when the run has not finished)."""
        from .record import RunFigures

        return RunFigures.from_dict(self.results())

    def oof(self, need: str | None = None) -> pd.DataFrame:
        """The out-of-fold predictions; `need` says what for, in the error raised when the run has none."""
        if not self.oof_file.is_file():
            why = f": {need}" if need else ""
            raise RunError(f"{self.path} has no {self.oof_file.name}{why}; let `melafast train` finish (or resume "
                           "it with --resume)")
        return pd.read_csv(self.oof_file, dtype={"image_name": str})

    @staticmethod
    def _record(path: Path, cls, again: str):
        "The typed record (`cls.from_dict`) saved in the JSON file `path`, None without one; `again`: how to redo it."
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as e:
            raise RunError(f"{path} is damaged ({e}): {again}") from None

    def operating_point(self):
        """threshold.json: the saved `OperatingPoint` (None when the run has none)."""
        from .record import OperatingPoint

        return self._record(self.operating_point_file, OperatingPoint,
                            "save it again with `melafast report --operating-point`")

    def recalibration(self):
        """recalibration.json: the saved `Recalibration` (None when the run has none)."""
        from .record import Recalibration

        return self._record(self.recalibration_file, Recalibration, "fit it again with `melafast recalibrate`")

    def info(self):
        """The run's config.json as a typed `RunInfo` (its `TrainConfig` and what training recorded beside it)."""
        from .record import RunInfo

        cfg = self.config()  # a missing, damaged or newer config says so here
        try:
            return RunInfo.from_config(cfg)
        except (TypeError, ValueError, MelafastError) as e:
            raise RunError(f"{self.config_file} holds settings this melafast cannot read ({e})") from None

    def train_config(self):
        """The run's training settings as a `TrainConfig` (settings it predates get the value then in effect)."""
        return self.info().settings

    def check_stack(self, data=None) -> Path:
        """Stop with one line when the run has no stack (`melafast stack` writes it), or when its dataset folder
        (`data`, else the run's) lacks the test table whose columns the stack reads; the dataset folder otherwise.
        Reads no table, so `submit --stack` says it before torch loads."""
        if not self.stack_file.is_file():
            raise RunError(f"{self.path} has no {self.stack_file.name}: run `melafast stack --run {self.path}` first")
        data = self.data_for(data)
        if "test" in missing_tables(data):
            raise DataError(f"{data} has no test.csv (nor test-metadata.csv): the stack reads the test table's columns "
                            "(the features of the images it scores)")
        return data

    def audit(self) -> pd.DataFrame | None:
        """The shortcut audit's table: audit.csv from `melafast audit`, else the one the report's section saved
        (None when neither ran)."""
        f = self.audit_path()
        return None if f is None else pd.read_csv(f)

    def audit_path(self, current: bool = False) -> Path | None:
        """Where the shortcut audit's table is (see `audit`); with `current`, only one written after every model
        file of the run (an audit of the models as they are now)."""
        for f in (self.audit_file, self.report_file.parent / f"{self.report_file.stem}_figures" / self.audit_file.name):
            if f.is_file():
                if current:
                    newest = max((p.stat().st_mtime for d in self.model_dirs() for p in model_files(d) if p.is_file()),
                                 default=0.0)
                    if f.stat().st_mtime < newest:
                        continue
                return f
        return None

    def metrics(self) -> pd.DataFrame | None:
        """metrics.csv, or None when the run has none."""
        return pd.read_csv(self.metrics_file) if self.metrics_file.is_file() else None

    def fold_config(self, k: int) -> dict:
        """The config.json of fold `k`'s model folder."""
        return json.loads((self.fold_dir(k) / MODEL_CONFIG).read_text())

    def finished_folds(self) -> tuple[list, list, dict]:
        """Out-of-fold rows, metric rows and kept epochs of the folds this run already completed (for resuming)."""
        from .record import ModelSpec

        if not (self.oof_file.is_file() and self.metrics_file.is_file()):
            return [], [], {}
        oof, metrics = self.oof(), self.metrics()
        oofs, mets, kept = [], [], {}
        for k, rows in oof.groupby("fold"):
            weights, cfg = model_files(self.fold_dir(k))
            if not (weights.is_file() and cfg.is_file()):
                continue
            oofs.append(rows)
            mets.append(metrics[metrics["fold"] == k])
            kept[int(k)] = ModelSpec.from_config(json.loads(cfg.read_text())).kept_epoch
        return oofs, mets, kept

    # ----------------------------------------------------------------------------------------------
    # Writing (atomic: a kill leaves the old file or the new one)

    def write_config(self, config: dict):
        write_json({"format": RUN_FORMAT, **config}, self.config_file)

    def write_results(self, results: dict):
        write_json(results, self.results_file)

    def write_oof(self, oof: pd.DataFrame):
        write_csv(oof, self.oof_file)

    def write_metrics(self, metrics: pd.DataFrame):
        write_csv(metrics, self.metrics_file)

    def write_operating_point(self, point):
        "Write an `OperatingPoint` (or its dict) to threshold.json; returns the `OperatingPoint`."
        from .record import OperatingPoint

        point = point if isinstance(point, OperatingPoint) else OperatingPoint.from_dict(point)
        write_json(point.to_dict(), self.operating_point_file)
        return point

    def write_recalibration(self, recal) -> None:
        write_json(recal.to_dict(), self.recalibration_file)

    def write_skipped(self, bad: pd.DataFrame):
        write_csv(bad, self.skipped_file)
