"""`melafast train` and `melafast lr-find`: their options are `TrainConfig`'s settings, declared once in config.py."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import TrainConfig
from .app import app, friendly
from .options import config_params, config_values, with_params

_RESUME = inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[Path], typer.Option("--resume", help="Continue this interrupted run folder with its own settings (other "
                                 "options but --workers are ignored).")])


def train(**options):
    """Train a cross-validated fold ensemble; write a run folder with models, metrics, OOF predictions and plots."""
    from ..processes import is_main
    from ..train.run import resume_run, train_run

    resume = options.pop("resume")
    if resume is not None:
        result = resume_run(resume, workers=options["workers"], log=typer.echo)
    else:
        result = train_run(TrainConfig(**config_values(TrainConfig, options)), log=typer.echo)
    if is_main():
        typer.echo(f"run folder: {result.path}")


app.command()(friendly(with_params(train, [*config_params(TrainConfig), _RESUME])))

# lr-find trains nothing: the settings of the epochs, the kept model and the run folder are not its own
_NOT_LR_FIND = ("epochs", "freeze_epochs", "lr", "lr_mult", "keep", "tta", "ema", "swa", "compile", "fold", "out")
_LR_FIND_OWN = [
    inspect.Parameter("fold", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=Annotated[
        int, typer.Option("--fold", help="Fold whose training split is used.")]),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=Path("lr_find.png"), annotation=Annotated[
        Path, typer.Option("--out", help="Where to save the plot.")]),
]


def lr_find(**options):
    """Run fastai's learning-rate finder on one fold of the table `train` would use; save the plot, print the
    suggestions."""
    from ..train.run import lr_find_run

    out = options.pop("out")
    fold = options.pop("fold")
    cfg = TrainConfig(**config_values(TrainConfig, options), fold=fold)
    lr_find_run(cfg, out=out, log=typer.echo)


app.command("lr-find")(friendly(with_params(lr_find, [*config_params(TrainConfig, skip=_NOT_LR_FIND), *_LR_FIND_OWN])))
