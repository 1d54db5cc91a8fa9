"""Options and choices shared by several commands, and the parsers of option values."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MelafastError


def choices(name: str, values: tuple) -> type:
    "A str Enum whose members are `values`: Typer shows them as the option's choices."
    return Enum(name, {v: v for v in values}, type=str)


Precision = choices("Precision", ("auto", "bf16", "fp16", "fp32"))


Split = choices("Split", ("test", "train"))


Blend = choices("Blend", ("mean", "rank"))


Keep = choices("Keep", ("last", "best"))


LrFindOn = choices("LrFindOn", ("frozen", "unfrozen"))
LrFindOnOpt = Annotated[LrFindOn, typer.Option("--lr-find-on", help="Model lr_find runs on: frozen (head only, what "
                                               "the first epochs train) or unfrozen (the whole network).")]


# Options shared by several commands
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset folder with train.csv (default data/; the "
                                                 "synthetic sample is written to data/sample when data/ is empty).")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder, if detection does not find it.")]
ArchOpt = Annotated[str, typer.Option("--arch", help="timm architecture name.")]
SizeOpt = Annotated[int, typer.Option("--size", help="Square image size in pixels.")]
BsOpt = Annotated[int, typer.Option("--bs", help="Batch size.")]
FoldsOpt = Annotated[int, typer.Option("--folds", help="Number of patient-grouped folds.")]
MetaOpt = Annotated[bool, typer.Option("--meta/--no-meta", help="Fuse patient metadata with the image.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto: bf16 on new GPUs, fp16 on old, fp32 on CPU.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local timm backbone checkpoint (.safetensors/.pth).")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for folds, initialisation and shuffling.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader processes (default: one per core, max 8).")]
TtaOpt = Annotated[int, typer.Option("--tta", help="Dihedral TTA views: 1, 2, 4 or 8.")]
RunTtaOpt = Annotated[Optional[int], typer.Option("--tta", help="Dihedral TTA views: 1, 2, 4 or 8 (default: the "
                                                  "run's, as it scored its out-of-fold predictions).")]
RunPrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="Precision to predict in (default: "
                                                          "each model's own, the one its out-of-fold predictions "
                                                          "were made with; fp32 where the device lacks it).")]
RunDataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the run's).")]


Target = choices("Target", ("melanoma", "diagnosis"))


Aug = choices("Aug", ("light", "medium", "heavy"))


BadImage = choices("BadImage", ("error", "skip"))


BadImageOpt = Annotated[BadImage, typer.Option("--on-bad-image", help="Unreadable, empty or truncated images: "
                                               "error (stop, listing them) or skip (leave out / median prediction).")]


def parse_fold(fold: str) -> Optional[int]:
    if fold == "all":
        return None
    try:
        return int(fold)
    except ValueError:
        raise MelafastError(f"--fold must be 'all' or a fold number, got {fold!r}") from None


def parse_lr(lr: str) -> Optional[float]:
    if lr == "auto":
        return None
    try:
        return float(lr)
    except ValueError:
        raise MelafastError(f"--lr must be a number or 'auto', got {lr!r}") from None


def as_str(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)
