"""The typed records a run folder holds, read next to `RunFolder`: the run's own config (`RunInfo`, whose settings are
a `TrainConfig`), a fold model's spec (`ModelSpec`: what rebuilds the model and its inputs) and the saved operating
point (`OperatingPoint`, with the decision it makes). Every surface (predict, submit, serve, export, calibrate, stack,
the pages) reads these objects instead of the raw JSON; runs written by older melafast convert here, in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import RunError

__all__ = ["RunInfo", "RunFigures", "ModelSpec", "OperatingPoint", "Recalibration", "SCALES", "CONFIG_FORMAT"]

CONFIG_FORMAT = 1  # a model folder's config.json format: bump it when that file changes incompatibly
_REQUIRED = {"format": int, "arch": str, "size": int, "meta": bool, "n_out": int, "pos": int, "vocab": list, "model": dict}
SCALES = ("model", "ensemble")  # an operating point's threshold applies to one fold model's score, or the fold mean


def _known(cls, d: dict, skip=()) -> dict:
    "The entries of `d` that are fields of `cls` (a None takes the field's default, as an absent entry does)."
    names = {f.name for f in fields(cls)} - set(skip)
    return {k: v for k, v in d.items() if k in names and v is not None}


@dataclass(frozen=True)
class RunInfo:
    """A run folder's config.json as a typed record: its settings and what training recorded beside them."""

    settings: object  # the `TrainConfig` it was trained with (settings it predates: the value then in effect)
    data: str | None = None  # the dataset folder it was trained on
    n_train: int | None = None  # training images of the main data
    n_melanoma: int | None = None  # melanomas among them
    n_external: int = 0  # external images that only ever trained
    n_pseudo: int = 0  # pseudo-labelled images that only ever trained
    pseudo_per_fold: bool | None = None  # the pseudo-labels came from per-fold teachers (None: no pseudo-labels)
    versions: dict = field(default_factory=dict)  # library versions that trained it
    command: str = ""  # the command line that trained it
    format: int = 1  # the run format

    @classmethod
    def from_config(cls, cfg: dict) -> "RunInfo":
        """From a run's config.json (checked by `RunFolder.config`), any format melafast wrote."""
        from .config import TrainConfig

        return cls(settings=TrainConfig.from_saved(cfg["settings"]), **_known(cls, cfg, skip=("settings",)))

    @property
    def metadata_columns(self) -> tuple[list, list]:
        """(categorical, continuous) metadata columns of the table the run read: those it declared, or the 2020 ones
        (sex, site; age). Not the patient-relative features computed from them (`settings.patient_features`)."""
        from .data.features import PATIENT_SUFFIXES
        from .data.columns import CAT_NAMES, CONT_NAMES

        s = self.settings
        if not s.cat and not s.cont:
            return list(CAT_NAMES), list(CONT_NAMES)
        return list(s.cat), [c for c in s.cont if not c.endswith(PATIENT_SUFFIXES)]

    @property
    def training_prevalence(self) -> float | None:
        """The share of melanomas the models learnt from (each shown `upsample` times per epoch), what their
        probabilities are scaled to; None when the run did not record its counts."""
        if not self.n_train or self.n_melanoma is None or not 0 < self.n_melanoma < self.n_train:
            return None
        k = self.settings.upsample or 1
        return self.n_melanoma * k / (self.n_train + self.n_melanoma * (k - 1))


@dataclass(frozen=True)
class RunFigures:
    """results.json as a typed record: the cross-validated figures `train` wrote (all None for an unfinished run).
    Per-fold figures are keyed by the fold number as text, as JSON keeps them."""

    oof_auc: float | None = None  # AUC of all out-of-fold predictions together: the honest CV
    fold_aucs: dict = field(default_factory=dict)  # fold -> its AUC
    oof_pauc: float | None = None  # partial AUC above `pauc_min_tpr` sensitivity (0 to 0.2)
    fold_paucs: dict = field(default_factory=dict)  # fold -> its pAUC
    pauc_min_tpr: float | None = None  # the sensitivity the pAUC starts at
    oof_sens_at_spec90: float | None = None  # sensitivity at 90% specificity
    headline: dict = field(default_factory=dict)  # every headline measure of the OOF rows (evaluate.figures.HEADLINE)
    tta: int | None = None  # dihedral TTA of the out-of-fold predictions
    keep: str | None = None  # which epoch each fold kept
    epoch_rule: str | None = None  # that rule in words
    kept_epochs: dict = field(default_factory=dict)  # fold -> the epoch kept
    oof_auc_no_meta: float | None = None  # the saved models' OOF AUC with every patient field blanked
    fold_aucs_no_meta: dict = field(default_factory=dict)
    no_meta_note: str | None = None  # how that figure was made
    oof_auc_selected: float | None = None  # with --keep best: the kept epochs' OOF AUC (optimistic)
    fold_aucs_selected: dict = field(default_factory=dict)
    selected_note: str | None = None
    cv_note: str | None = None  # why the CV is optimistic, when it is
    nondeterministic_ops: list | None = None  # with --deterministic: operations without a deterministic kernel

    @classmethod
    def from_dict(cls, d: dict) -> "RunFigures":
        return cls(**_known(cls, d))

    @property
    def saved_auc(self) -> float | None:
        "The OOF AUC of the models the run saved: the kept epochs' with --keep best (optimistic), else the honest one."
        return self.oof_auc_selected if self.oof_auc_selected is not None else self.oof_auc


@dataclass(frozen=True)
class ModelSpec:
    """One fold model's config.json as a typed record: the network, its inputs and how it was validated."""

    arch: str  # timm architecture
    size: int  # square input size in pixels
    meta: bool  # the model takes a metadata vector
    n_out: int  # classes
    vocab: list  # class names, in output order
    pos: int  # index of the melanoma class
    model: dict  # MelanomaModel's keyword arguments (its `config`)
    meta_proc: dict | None = None  # the fitted metadata encoding (MetaProcessor.to_dict), None without metadata
    precision: str | None = None  # what training resolved to (None: saved before it was recorded)
    channels_last: bool | None = None  # memory layout it was validated in (None: saved before it was recorded)
    tta: int = 8  # dihedral TTA of its out-of-fold predictions (8 before it was recorded)
    fold: int | None = None  # the fold it validated
    keep: str = "last"  # which epoch it is: last, or best (chosen on its validation rows)
    kept_epoch: object = None  # the epoch saved (an int, or "swa")
    valid_auc: float | None = None  # AUC of this saved model on its validation fold (optimistic with keep best)
    valid_auc_no_meta: float | None = None  # the same with every patient field blanked
    meta_dropout: float = 0.0  # share of training rows whose patient fields were blanked
    files: dict | None = None  # what --extra-meta's file features were computed on (`file_reference`)
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON as read (for its other fields)

    @classmethod
    def read(cls, cfg_file) -> "ModelSpec":
        """The spec in a model folder's config.json `cfg_file`, checked: it exists, is JSON with the fields a model
        needs, and of a format this melafast reads."""
        import json
        from pathlib import Path

        from . import __version__

        cfg_file = Path(cfg_file)
        if not cfg_file.is_file():
            raise RunError(f"{cfg_file.parent} is not a melafast model folder: {cfg_file.name} is missing")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{cfg_file} is not valid JSON ({e}); the run may have been interrupted: train it "
                           "again") from None
        if not isinstance(cfg, dict):
            raise RunError(f"{cfg_file} does not hold a melafast model config")
        for key, typ in _REQUIRED.items():
            if not isinstance(cfg.get(key), typ):
                raise RunError(f"{cfg_file}: field {key!r} is missing or not a {typ.__name__}")
        if cfg["format"] > CONFIG_FORMAT:
            raise RunError(f"{cfg_file} was written by melafast {cfg.get('melafast_version', '?')} (format "
                           f"{cfg['format']}); this melafast {__version__} reads format {CONFIG_FORMAT} or older: "
                           "upgrade melafast")
        try:
            return cls.from_config(cfg)
        except (TypeError, ValueError) as e:
            raise RunError(f"{cfg_file} is not a model config this melafast reads ({e})") from None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelSpec":
        """The spec of a model folder's config.json, from any format melafast wrote."""
        kw = _known(cls, cfg, skip=("raw",))
        if "kept_epoch" not in kw and cfg.get("best_epoch") is not None:  # saved before --keep: the best epoch
            kw.update(kept_epoch=cfg["best_epoch"], keep="best")
        model = dict(cfg["model"])
        if model.get("blank_flags") and cfg.get("meta_proc"):
            # the rows the image head scores: those whose every given field is missing, by the encoding's own rule
            # (models saved before it counted n_images and patient-relative columns as given fields)
            model["blank_flags"] = cls._proc(cfg["meta_proc"]).patient_flags() or model["blank_flags"]
        kw["model"] = model
        return cls(**kw, raw=cfg)

    @staticmethod
    def _proc(d):
        from .data.meta import MetaProcessor

        return MetaProcessor.from_dict(d)

    @property
    def meta_processor(self):
        "The fitted `MetaProcessor` (None for an image-only model)."
        return self._proc(self.meta_proc) if self.meta and self.meta_proc else None

    @property
    def extra_meta(self) -> bool:
        "Trained with --extra-meta: features computed over the whole table and the image files."
        from .data.features import EXTRA_CONT_NAMES

        return self.meta and any(c in EXTRA_CONT_NAMES for c in (self.meta_proc or {}).get("cont_names", []))

    @property
    def patient_features(self) -> bool:
        "Trained with --patient-features: features computed over each patient's other lesions in the table."
        from .data.features import PATIENT_SUFFIXES

        return self.meta and any(c.endswith(PATIENT_SUFFIXES) for c in (self.meta_proc or {}).get("cont_names", []))


def figure_in_words(fig: dict, digits: int = 3) -> str:
    "One of threshold.json's figures ({value, lo, hi}) as 'value (lo to hi)'."
    return f"{fig['value']:.{digits}f} ({fig['lo']:.{digits}f} to {fig['hi']:.{digits}f})"


@dataclass(frozen=True)
class OperatingPoint:
    """threshold.json: the operating point `predict`, `serve` and the exported runtime decide with."""

    threshold: float  # on the melanoma probability
    operating_point: str = "threshold"  # its name: sens90, spec95, threshold (one given by hand)
    goal: str = ""  # what it aims at, in words
    rule: str = ""  # how a decision is made from the fold models, in words
    scale: str = "model"  # model: each fold model's score votes; ensemble: the fold mean against the threshold
    tta: int | None = None  # the TTA of the scores it was chosen on
    n_models: int | None = None  # fold models of the run when it was chosen
    chosen_on: str = ""  # which rows chose it, in words
    crossfit: dict = field(default_factory=dict)  # its figures where the threshold was not chosen
    in_sample: dict = field(default_factory=dict)  # its figures on the rows that chose it (optimistic)
    fold_thresholds: list | None = None  # the threshold each part's complement chose
    prevalence: float | None = None  # the prevalence its predictive values are stated at
    calibration: dict | None = None  # the calibration set, for a point chosen on one
    paths: dict | None = None  # input path -> its cross-fitted figures at this point ("as given", "no metadata")
    meta: bool | None = None  # the run used metadata
    saved: str | None = None  # when

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingPoint":
        """From threshold.json, any format melafast wrote (a point saved before `scale` existed is on the model
        scale)."""
        try:
            point = cls(**_known(cls, d))
            object.__setattr__(point, "threshold", float(point.threshold))
        except (TypeError, ValueError, AttributeError):
            raise RunError(f"the saved operating point is not one melafast reads: {str(d)[:200]}") from None
        if point.scale not in SCALES:
            raise RunError(f"the saved operating point has scale {point.scale!r}; melafast knows {', '.join(SCALES)}")
        return point

    def to_dict(self) -> dict:
        return asdict(self)

    def paths_in_words(self) -> str | None:
        """The point's figures on each input path in words (None when it has them for one path only): one threshold
        serves images with their metadata and images without, and each path reaches its own sensitivity and
        specificity."""
        paths = self.paths or {}
        if not paths.get("no metadata") or not paths.get("as given") or paths["as given"].get("sensitivity") is None:
            return None

        def f(p, m):
            return figure_in_words(p[m])

        given, none = paths["as given"], paths["no metadata"]
        return ("One threshold serves both input paths: cross-fitted, images with their metadata reach sensitivity "
                f"{f(given, 'sensitivity')} and specificity {f(given, 'specificity')}; the same images with every "
                f"patient field blanked (a patient who comes without metadata) reach sensitivity "
                f"{f(none, 'sensitivity')} and specificity {f(none, 'specificity')}.")

    def decide(self, per_model):
        """(0/1 decisions, votes) from each fold model's probabilities (one array each): on the model scale the vote
        of the fold models against the threshold (melanoma when at least half say so), on the ensemble scale the
        fold mean against it. `votes` counts the models at or above the threshold."""
        import numpy as np

        scores = np.asarray(per_model, dtype=np.float64)
        votes = (scores >= self.threshold).sum(axis=0)
        if self.scale == "ensemble":
            return (scores.mean(axis=0) >= self.threshold).astype(np.int8), votes
        return (2 * votes >= len(scores)).astype(np.int8), votes


@dataclass(frozen=True)
class Recalibration:
    """recalibration.json: a monotone map from predict's probability (`pred`, the fold mean) to a recalibrated one,
    p' = sigmoid(slope * logit(p) + shift) (temperature scaling with a shift: Platt's method), fitted on the run's
    out-of-fold rows or on a calibration set of unseen patients. Monotone, so every ranking figure (AUC, pAUC) and
    the operating point's decisions are unchanged; `prevalence` is the share of melanomas it was fitted at."""

    slope: float
    shift: float
    fitted_on: str = ""  # in words: the out-of-fold rows, or a calibration set of N images
    images: int = 0
    melanomas: int = 0
    prevalence: float | None = None
    ece_before: float | None = None  # cross-fitted on the rows it was fitted on
    ece_after: float | None = None
    brier_before: float | None = None
    brier_after: float | None = None
    source: str = "oof"  # "oof" or "calibration set"
    created: str = ""

    def apply(self, p):
        "The recalibrated probabilities of `p` (any array-like)."
        from .metrics import logit, sigmoid

        return sigmoid(self.slope * logit(p) + self.shift)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recalibration":
        from dataclasses import fields

        if not {"slope", "shift"} <= set(d):
            raise ValueError("recalibration.json needs slope and shift")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
