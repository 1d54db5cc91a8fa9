"""The settings of a training run: one typed dataclass, checked in one place, saved as the run's config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MelafastError

__all__ = ["TrainConfig", "KEEP_RULES", "LR_FIND_ON", "epoch_rule"]

KEEP_RULES = ("last", "best")  # which epoch a fold keeps (TrainConfig.keep)
LR_FIND_ON = ("frozen", "unfrozen")  # which model `--lr auto` runs lr_find on (TrainConfig.lr_find_on)


def epoch_rule(keep: str, swa: int = 0) -> str:
    """How a fold's model is chosen, in words, for the run's log and results.json."""
    if swa:
        return f"the mean of the weights after the last {swa} epochs (SWA): nothing chosen on the validation rows"
    if keep == "last":
        return "the model after the last epoch: nothing chosen on the validation rows, the CV is honest"
    return ("the epoch with the best validation AUC: chosen on the rows it is scored on, so its CV is optimistic; "
            "the honest CV is the last epoch's")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as the run folder's config.json."""

    data: str | None = None  # dataset folder; None = data/ (the synthetic sample is written there when empty)
    images: str | None = None  # image folder, when the automatic detection is not enough
    arch: str = "efficientnet_b3"  # any timm model name
    size: int = 384  # square input size in pixels
    epochs: int = 10  # epochs with the whole network training
    freeze_epochs: int = 1  # epochs before those with the backbone frozen (metadata MLP + head only)
    bs: int = 64  # batch size
    lr: float | None = None  # base learning rate; None = lr_find's valley, found per fold
    lr_find_on: str = "frozen"  # with lr None: run lr_find on the frozen model (head only) or the unfrozen one
    lr_mult: float = 1.0  # head lr / backbone lr once unfrozen (fastai's fine_tune uses 100; 1 measured better)
    keep: str = "last"  # which epoch each fold keeps: last (honest CV) or best (chosen on the scored rows: optimistic)
    frozen_bn: bool = True  # frozen epochs leave the backbone's batch-norm running statistics unchanged
    folds: int = 5  # number of patient-grouped folds
    fold: int | None = None  # train this fold only; None = every fold
    meta: bool = True  # fuse the patient metadata with the image
    meta_dropout: float = 0.0  # share of training rows whose patient fields are blanked (all, or one), as a hole looks
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    tta: int = 8  # dihedral views for the out-of-fold predictions: 1, 2, 4 or 8
    weights: str | None = None  # local timm checkpoint for the backbone
    pretrained: bool = True  # start from ImageNet weights
    seed: int = 42  # folds, initialisation, shuffling
    deterministic: bool = False  # deterministic GPU algorithms, no cuDNN autotuning: reproducible GPU runs, slower
    workers: int | None = None  # DataLoader processes; None = one per core, at most 8
    out: str | None = None  # run folder; None = runs/<arch>-<size>-<date-time>
    on_bad_image: str = "error"  # error: stop and list unusable images; skip: leave them out and list them
    compile: bool = False  # torch.compile the backbone
    external: list = field(default_factory=list)  # extra datasets (same CSV format): training rows only, never scored
    upsample: int = 1  # melanomas of the training split appear this many times per epoch
    target: str = "melanoma"  # melanoma (2 classes) or diagnosis (one class per diagnosis; melanoma is scored)
    extra_meta: bool = False  # add images-per-patient and log file size to the metadata
    aug: str = "medium"  # augmentation preset: light, medium or heavy
    ema: float | None = None  # decay of an exponential moving average of the weights (e.g. 0.999); None = off
    swa: int = 0  # average the weights of the last `swa` epochs (batch norm recomputed) and keep that; 0 = off
    pseudo: str | None = None  # pseudo-label CSV from `melafast pseudo`: soft-labelled test rows join training

    def validate(self) -> "TrainConfig":
        """Check every value; raise `MelafastError` naming the first one that is wrong."""
        from .data import AUG_PRESETS, BAD_IMAGE_MODES, TARGETS
        from .inference import PRECISIONS

        checks = [
            (16 <= self.size <= 2048, f"--size must be between 16 and 2048 pixels, got {self.size}"),
            (self.bs > 0, f"--bs must be positive, got {self.bs}"),
            (self.epochs >= 0 and self.freeze_epochs >= 0 and self.epochs + self.freeze_epochs > 0,
             f"--epochs and --freeze-epochs must be >= 0 and not both 0, got {self.epochs} and {self.freeze_epochs}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive or 'auto', got {self.lr}"),
            (self.lr_mult >= 1, f"--lr-mult must be 1 or more, got {self.lr_mult}"),
            (self.lr_find_on in LR_FIND_ON, f"--lr-find-on must be frozen or unfrozen, got {self.lr_find_on}"),
            (self.keep in KEEP_RULES, f"--keep must be last or best, got {self.keep}"),
            (not (self.swa and self.keep == "best"), "--swa keeps the average of the last epochs: --keep best does not "
             "apply (leave --keep last)"),
            (self.folds >= 2, f"--folds must be at least 2, got {self.folds}"),
            (self.fold is None or 0 <= self.fold < self.folds, f"--fold must be 'all' or 0..{self.folds - 1}, got {self.fold}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision}"),
            (self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.on_bad_image in BAD_IMAGE_MODES, f"--on-bad-image must be error or skip, got {self.on_bad_image}"),
            (self.upsample >= 1, f"--upsample must be 1 or more, got {self.upsample}"),
            (0 <= self.meta_dropout < 1, f"--meta-dropout must be in [0, 1), got {self.meta_dropout}"),
            (self.target in TARGETS, f"--target must be melanoma or diagnosis, got {self.target}"),
            (self.aug in AUG_PRESETS, f"--aug must be light, medium or heavy, got {self.aug}"),
            (self.ema is None or 0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.swa >= 0, f"--swa must be 0 (off) or a number of epochs, got {self.swa}"),
            (self.swa <= (self.epochs or self.freeze_epochs), f"--swa {self.swa} averages more epochs than the last "
             f"phase of training has ({self.epochs or self.freeze_epochs})"),
            (not (self.swa and self.ema is not None), "--swa and --ema both average the weights: choose one"),
            (self.pseudo is None or self.target == "melanoma",
             "--pseudo gives melanoma probabilities: it works with --target melanoma only"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MelafastError(msg)
        from .model import check_arch
        from .tta import dihedral_views

        dihedral_views(self.tta)
        check_arch(self.arch)
        return self
