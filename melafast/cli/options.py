"""Options shared by several commands, and the options of `TrainConfig`'s settings, built from their declarations."""

from __future__ import annotations

import inspect
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..config import BAD_IMAGE_MODES, BLENDS, PRECISIONS, settings_of
from ..errors import MelafastError


@lru_cache(maxsize=None)
def choices(name: str, values: tuple) -> type:
    "A str Enum whose members are `values`: Typer shows them as the option's choices."
    return Enum(name, {v: v for v in values}, type=str)


Precision = choices("Precision", PRECISIONS)
Split = choices("Split", ("test", "train"))
Blend = choices("Blend", BLENDS)
BadImage = choices("BadImage", BAD_IMAGE_MODES)


# --------------------------------------------------------------------------------------------------
# Options of the commands that use a trained run

ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder, if detection does not find it.")]
BsOpt = Annotated[int, typer.Option("--bs", help="Batch size.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for folds, initialisation and shuffling.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader processes (default: one per core, max 8).")]
RunTtaOpt = Annotated[Optional[int], typer.Option("--tta", help="Dihedral TTA views: 1, 2, 4 or 8 (default: the "
                                                  "run's, as it scored its out-of-fold predictions).")]
RunPrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="Precision to predict in (default: "
                                                              "each model's own, the one its out-of-fold predictions "
                                                              "were made with; fp32 where the device lacks it).")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples (whole patients).")]
RunDataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the run's).")]
FinishedRunOpt = Annotated[Path, typer.Option("--run", help="Finished run folder from `melafast train`.")]
BadImageOpt = Annotated[BadImage, typer.Option("--on-bad-image", help="Unreadable, empty or truncated images: "
                                               "error (stop, listing them) or skip (leave out / median prediction).")]


def value(choice):
    "An option's plain value: an Enum's value, a Path as str, a list of Paths as strs."
    if isinstance(choice, Enum):
        return choice.value
    if isinstance(choice, Path):
        return str(choice)
    if isinstance(choice, (list, tuple)):
        return [value(v) for v in choice]
    return choice


# --------------------------------------------------------------------------------------------------
# The options of a settings dataclass (TrainConfig), from its declarations


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


_OPTIONAL = {"int | None": Optional[int], "float | None": Optional[float], "str | None": Optional[str]}


def _cli_type(name: str, s, default, type_name: str):
    "The Typer annotation and default of one declared setting."
    if s.kind == "path":
        return Optional[Path], None
    if s.kind == "paths":
        return Optional[List[Path]], None
    if s.kind == "names":
        return Optional[List[str]], None
    if s.kind == "lr":
        return str, "auto" if default is None else str(default)
    if s.kind == "fold":
        return str, "all" if default is None else str(default)
    if s.choices and all(isinstance(c, str) for c in s.choices):
        enum = choices("".join(w.title() for w in name.split("_")), tuple(s.choices))
        return enum, enum(default)
    if type_name in _OPTIONAL:
        return _OPTIONAL[type_name], default
    return type(default), default


def config_params(cls, skip=()) -> list:
    """`inspect.Parameter`s for every command-line setting of `cls` but `skip`, in declaration order: each an
    option with its declared flag, type, default, choices and help."""
    from dataclasses import fields

    types = {f.name: str(f.type) for f in fields(cls)}
    params = []
    for name, (s, default) in settings_of(cls).items():
        if name in skip or not s.cli:
            continue
        annotation, default = _cli_type(name, s, default, types[name])
        option = typer.Option(s.flag or f"--{name.replace('_', '-')}", help=s.help)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[annotation, option]))
    return params


def config_values(cls, opts: dict) -> dict:
    """The values for `cls(...)` of the command-line options `opts` made by `config_params`."""
    known = settings_of(cls)
    out = {}
    for name, v in opts.items():
        kind = known[name][0].kind
        out[name] = parse_lr(v) if kind == "lr" else parse_fold(v) if kind == "fold" else value(v)
        if kind in ("paths", "names") and out[name] is None:
            out[name] = []
    return out


def with_params(fn, params: list):
    "Give `fn(**options)` the signature Typer reads: `params` (keyword-only options)."
    fn.__signature__ = inspect.Signature(params)
    return fn


def check_run(*runs) -> None:
    """Stop with one line, before torch loads, when a run folder holds no trained model (or is not a run)."""
    from ..runfolder import RunFolder

    for run in runs:
        if run is not None:
            RunFolder(run).model_dirs()
