"""The settings of a training run, each declared once: name, type, default, choices or range, and one line of help.

`TrainConfig` is a typed dataclass (saved as the run's config.json); its per-setting checks (`validate`), the
`melafast train` and `lr-find` options (`cli.train_cmd` builds them from these fields) and the value an old run
folder gets on resume all derive from the `setting(...)` of each field. A new setting is one declaration plus its
use. This module is a leaf: it imports nothing of melafast, so every layer reads the choices from here.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from .errors import MelafastError

__all__ = ["TrainConfig", "Setting", "setting", "settings_of", "epoch_rule", "KEEP_RULES", "LR_FIND_ON", "PRECISIONS",
           "AUG_PRESETS", "TARGETS", "BAD_IMAGE_MODES", "BLENDS", "TTA_VIEWS", "META_DROPOUT", "DROPOUT_PATTERNS",
           "DUP_DISTANCE"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU
AUG_PRESETS = ("light", "medium", "heavy")  # batch augmentation presets (all flip and turn)
TARGETS = ("melanoma", "diagnosis")  # what a model is trained to predict (melanoma is what is scored)
BAD_IMAGE_MODES = ("error", "skip")  # what to do with an image file that cannot be used
KEEP_RULES = ("last", "best")  # which epoch a fold keeps
LR_FIND_ON = ("frozen", "unfrozen")  # which model `--lr auto` runs lr_find on
BLENDS = ("mean", "rank")  # how runs are blended
TTA_VIEWS = (1, 2, 4, 8)  # dihedral TTA views
_SAME = object()  # a setting whose value did not change meaning when it was introduced: old runs get the default
# the share of training rows whose patient fields are blanked, chosen on CV figures (docs/metadata.md)
META_DROPOUT = 0.5
DROPOUT_PATTERNS = ("subsets", "all_or_one")
# perceptual-hash bits (of 256) at which two images are near-duplicates: on HAM10000 every copy resized to 75% and
# re-encoded is found at 15, and every pair found among its 10,015 images is one lesion (benchmarks/dedup.py); up to
# 15 the matching compares only images that share a 2-byte block of the hash, which keeps 400,000 images in reach
DUP_DISTANCE = 15  # which patient fields metadata dropout blanks together (MetaDropout)


@dataclass(frozen=True)
class Setting:
    """What a field of `TrainConfig` is, for its checks and its command-line option."""

    help: str  # one line, shown by --help
    choices: tuple | None = None  # the values allowed
    low: float | None = None  # smallest value allowed (or the last not allowed, with open_low)
    open_low: bool = False  # `low` itself is not allowed
    high: float | None = None  # largest value allowed (or the first not allowed, with open_high)
    open_high: bool = False  # `high` itself is not allowed
    must: str | None = None  # the rule in words, when the generated one would read worse ("positive")
    flag: str | None = None  # the option's name(s) when not --name (a bool's "--yes/--no" pair)
    kind: str | None = None  # how the command line reads it: path, paths, names, lr (a number or auto), fold (all or K)
    cli: bool = True  # an option of `melafast train`
    before: object = _SAME  # the value a run saved before the setting existed had in effect (for resuming it)

    def option(self, name: str) -> str:
        return (self.flag or f"--{name.replace('_', '-')}").split("/")[0]

    def rule(self) -> str | None:
        "The check in words: what the value must be."
        if self.must:
            return self.must
        if self.choices:
            c = [str(v) for v in self.choices]
            return f"{', '.join(c[:-1])} or {c[-1]}"
        if self.low is not None and self.high is not None:
            return (f"in [{self.low:g}, {self.high:g})" if self.open_high else
                    f"between {self.low:g} and {self.high:g}")
        if self.low is not None:
            return f"more than {self.low:g}" if self.open_low else f"{self.low:g} or more"
        return None

    def ok(self, value) -> bool:
        if value is None:
            return True  # None is each optional setting's "off" / "automatic"
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and (value < self.low or (value == self.low and self.open_low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.open_high)


def setting(default, help: str, **kw):
    """A `TrainConfig` field: its default and its `Setting` (see there for the keywords)."""
    meta = {"setting": Setting(help, **kw)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def settings_of(cls) -> dict:
    """name -> (Setting, default) of every declared field of `cls`, in declaration order."""
    out = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        out[f.name] = (f.metadata["setting"], default)
    return out


def epoch_rule(keep: str, swa: int = 0) -> str:
    """How a fold's model is chosen, in words, for the run's log and its results."""
    if swa:
        return f"the mean of the weights after the last {swa} epochs (SWA): nothing chosen on the validation rows"
    if keep == "last":
        return "the model after the last epoch: nothing chosen on the validation rows, the CV is honest"
    return ("the epoch with the best validation AUC: chosen on the rows it is scored on, so its CV is optimistic; "
            "the honest CV is the last epoch's")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as the run folder's config.json."""

    data: str | None = setting(None, "Dataset folder with train.csv (default data/; the synthetic sample is written to "
                               "data/sample when data/ is empty).", kind="path")
    images: str | None = setting(None, "Image folder, if detection does not find it.", kind="path")
    arch: str = setting("efficientnet_b3", "timm architecture name.")
    size: int = setting(384, "Square image size in pixels.", low=16, high=2048, must="between 16 and 2048 pixels")
    epochs: int = setting(10, "Epochs with the whole network training.", low=0)
    freeze_epochs: int = setting(1, "Epochs first with the backbone frozen (metadata MLP and head only).", low=0)
    bs: int = setting(64, "Batch size (per process when data-parallel).", low=1, must="positive")
    lr: float | None = setting(None, "Base learning rate, or 'auto' for lr_find's valley per fold.", kind="lr",
                               low=0, open_low=True, must="positive or 'auto'")
    lr_find_on: str = setting("frozen", "Model lr_find runs on: frozen (head only, what the first epochs train) or "
                              "unfrozen (the whole network).", choices=LR_FIND_ON)
    lr_mult: float = setting(1.0, "Head learning rate / backbone learning rate once unfrozen (fastai's fine_tune "
                             "uses 100).", low=1)  # before it existed: 100 for pretrained backbones (resume_run)
    keep: str = setting("last", "Epoch each fold keeps: last (the CV is honest) or best (chosen on the validation "
                        "rows: optimistic; the honest last-epoch CV is reported too).", choices=KEEP_RULES,
                        before="best")
    frozen_bn: bool = setting(True, "During frozen epochs keep the backbone's batch-norm statistics fixed, or let "
                              "them adapt to the data.", flag="--frozen-bn/--adapt-bn", before=False)
    folds: int = setting(5, "Number of patient-grouped folds.", low=2, must="at least 2")
    group_by: str = setting("patient_id", "Column of train.csv whose values stay in one fold: patient_id, or e.g. "
                            "attribution (folds by institution: the CV then scores clinics it did not train on) or "
                            "lesion_id. A patient's images always stay together.")
    dedup: int = setting(DUP_DISTANCE, "Near-duplicate images (perceptual hashes at most this many bits of 256 "
                         "apart, 0 to 31) stay in one fold, and external images that duplicate a training image are "
                         "dropped; -1: off.", low=-1, high=31, before=-1)
    fold: int | None = setting(None, "'all', or one fold number to train only that fold.", kind="fold")
    meta: bool = setting(True, "Fuse patient metadata with the image.", flag="--meta/--no-meta")
    cat: list = setting([], "Categorical metadata column of train.csv (repeatable). With --cont, they replace the "
                        "2020 columns (sex, site; age), the default.", kind="names")
    cont: list = setting([], "Continuous metadata column of train.csv (repeatable); see --cat.", kind="names")
    patient_features: bool = setting(False, "Add each continuous column's z-score and rank among the same patient's "
                                     "lesions (\"ugly duckling\" features; no labels used).",
                                     flag="--patient-features/--no-patient-features")
    meta_dropout: float = setting(META_DROPOUT, "Share of training rows whose patient fields are blanked (all of "
                                  "them, or one), as a real hole looks: trains the path images without metadata take.",
                                  low=0, high=1, open_high=True, before=0.0)
    dropout_patterns: str = setting("subsets", "Which fields metadata dropout blanks in a row: subsets (a random "
                                    "subset, 1 to all fields) or all_or_one (every field, or exactly one).",
                                    choices=DROPOUT_PATTERNS, before="all_or_one")
    image_head: bool = setting(True, "With metadata, score images that come without any patient field by an image-only "
                               "head trained on every row, instead of the joint head's image part.",
                               flag="--image-head/--no-image-head", before=False)
    color_constancy: int = setting(0, "Shades of Gray colour constancy on every image, in training and every "
                                   "prediction path: the Minkowski p of the illuminant estimate (6, as ISIC 2018-2019 "
                                   "winners used), or 0 for off.", low=0, before=0)
    precision: str = setting("auto", "auto: bf16 on new GPUs, fp16 on old, fp32 on the CPU.", choices=PRECISIONS)
    tta: int = setting(8, "Dihedral TTA views for the out-of-fold predictions.", choices=TTA_VIEWS)
    weights: str | None = setting(None, "Local timm backbone checkpoint (.safetensors/.pth).", kind="path")
    pretrained: bool = setting(True, "Start from ImageNet weights.", flag="--pretrained/--no-pretrained")
    seed: int = setting(42, "Seed for folds, initialisation and shuffling.")
    deterministic: bool = setting(False, "Deterministic GPU kernels, no cuDNN autotuning: the same seed gives the same "
                                  "bits on this machine and software, slower; operations torch has no deterministic "
                                  "kernel for still run and are listed. (The CPU repeats anyway.)",
                                  flag="--deterministic")
    workers: int | None = setting(None, "DataLoader processes (default: one per core, max 8).", low=0)
    out: str | None = setting(None, "Run folder (default runs/<arch>-<size>-<time>).", kind="path")
    on_bad_image: str = setting("error", "Unreadable, empty or truncated images: error (stop, listing them) or skip "
                                "(leave them out).", choices=BAD_IMAGE_MODES)
    compile: bool = setting(False, "torch.compile the backbone (GPU; the first epoch pays minutes of compilation).",
                            flag="--compile/--no-compile")
    external: list = setting([], "Extra dataset in the same CSV format (repeatable): training rows only, never "
                             "scored.", kind="paths")
    upsample: int = setting(1, "Show each training melanoma K times per epoch.", low=1)
    neg_per_pos: int | None = setting(None, "Each epoch trains on every melanoma and K times as many other lesions, "
                                      "drawn afresh (seeded), so an epoch costs what the melanomas need; the OOF and "
                                      "every validation still score every row. Default: every row, every epoch.",
                                      low=1)
    target: str = setting("melanoma", "melanoma (2 classes) or diagnosis (one class per diagnosis; the melanoma "
                          "probability is scored).", choices=TARGETS)
    extra_meta: bool = setting(False, "Add images per patient and log file size to the metadata.",
                               flag="--extra-meta/--no-extra-meta")
    aug: str = setting("medium", "Augmentation preset (all presets flip and turn).", choices=AUG_PRESETS)
    ema: float | None = setting(None, "Validate and keep an exponential moving average of the weights with this decay "
                                "(e.g. 0.999).", low=0, high=1, open_high=True)
    swa: int = setting(0, "Average the weights of the last N epochs (SWA; batch-norm statistics recomputed), validate "
                       "and keep that average. 0 = off.", low=0, must="0 (off) or a number of epochs")
    pseudo: str | None = setting(None, "Pseudo-label CSV from `melafast pseudo`: its soft-labelled test images join "
                                 "the training folds.", kind="path")

    def validate(self) -> "TrainConfig":
        """Check every value; raise `MelafastError` naming the first one that is wrong and what it must be.

        Each setting's own rule comes from its declaration; the rules between settings follow.
        """
        for name, (s, _) in settings_of(type(self)).items():
            value = getattr(self, name)
            if not s.ok(value):
                raise MelafastError(f"{s.option(name)} must be {s.rule()}, got {value}")
        checks = [
            (self.epochs + self.freeze_epochs > 0, "--epochs and --freeze-epochs must not both be 0"),
            (not (self.swa and self.keep == "best"), "--swa keeps the average of the last epochs: --keep best does not "
             "apply (leave --keep last)"),
            (self.fold is None or 0 <= self.fold < self.folds, f"--fold must be 'all' or 0..{self.folds - 1}, got {self.fold}"),
            (self.swa <= (self.epochs or self.freeze_epochs), f"--swa {self.swa} averages more epochs than the last "
             f"phase of training has ({self.epochs or self.freeze_epochs})"),
            (not (self.swa and self.ema is not None), "--swa and --ema both average the weights: choose one"),
            (self.pseudo is None or self.target == "melanoma",
             "--pseudo gives melanoma probabilities: it works with --target melanoma only"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MelafastError(msg)
        return self

    @classmethod
    def from_saved(cls, settings: dict) -> "TrainConfig":
        """A config from a saved run's settings: a setting the run predates gets the value that was in effect then
        (its declared `before`), or its default; names this melafast does not know are an error (a newer run)."""
        known = settings_of(cls)
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise MelafastError(f"settings this melafast does not know: {', '.join(unknown)}")
        values = dict(settings)
        if "lr_mult" not in values:  # saved before --lr-mult: pretrained backbones then trained at lr/100
            values["lr_mult"] = 100.0 if values.get("pretrained", True) or values.get("weights") else 1.0
        for name, (s, _) in known.items():
            if name not in values and s.before is not _SAME:
                values[name] = s.before
        return cls(**values)
