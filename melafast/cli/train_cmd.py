"""`melafast train` and `melafast lr-find`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .app import app, friendly
from .options import (Aug, ArchOpt, BadImage, BadImageOpt, BsOpt, DataOpt, FoldsOpt, ImagesOpt, Keep, LrFindOn, LrFindOnOpt,
                      MetaOpt, Precision, PrecisionOpt, PretrainedOpt, SeedOpt, SizeOpt, Target, TtaOpt, WeightsOpt,
                      WorkersOpt, as_str, parse_fold, parse_lr)


@app.command()
@friendly
def train(
    data: DataOpt = None,
    images: ImagesOpt = None,
    arch: ArchOpt = "efficientnet_b3",
    size: SizeOpt = 384,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs with the whole network training.")] = 10,
    bs: BsOpt = 64,
    lr: Annotated[str, typer.Option("--lr", help="Base learning rate, or 'auto' for lr_find's valley per fold.")] = "auto",
    freeze_epochs: Annotated[int, typer.Option("--freeze-epochs", help="Epochs first with the backbone frozen.")] = 1,
    lr_find_on: LrFindOnOpt = LrFindOn.frozen,
    lr_mult: Annotated[float, typer.Option("--lr-mult", help="Head learning rate / backbone learning rate once "
                                           "unfrozen (fastai's fine_tune uses 100).")] = 1.0,
    keep: Annotated[Keep, typer.Option("--keep", help="Epoch each fold keeps: last (the CV is honest) or best "
                                       "(chosen on the validation rows: the CV it reports is optimistic; the honest "
                                       "last-epoch CV is reported too).")] = Keep.last,
    frozen_bn: Annotated[bool, typer.Option("--frozen-bn/--adapt-bn", help="During frozen epochs keep the backbone's "
                                            "batch-norm statistics fixed, or let them adapt to the data.")] = True,
    folds: FoldsOpt = 5,
    fold: Annotated[str, typer.Option("--fold", help="'all', or one fold number to train only that fold.")] = "all",
    meta: MetaOpt = True,
    meta_dropout: Annotated[float, typer.Option("--meta-dropout", help="Share of training rows whose patient fields "
                                                "are blanked (all, or one at random), so that images without metadata "
                                                "meet a trained missing path.")] = 0.0,
    precision: PrecisionOpt = Precision.auto,
    tta: TtaOpt = 8,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    seed: SeedOpt = 42,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic GPU kernels and no cuDNN "
                                                "autotuning: the same seed gives the same bits on this machine and "
                                                "software, slower; the few operations torch has no deterministic "
                                                "kernel for still run and are listed in results.json. (The CPU "
                                                "repeats anyway.)")] = False,
    workers: WorkersOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<arch>-<size>-<time>).")] = None,
    on_bad_image: BadImageOpt = BadImage.error,
    external: Annotated[Optional[List[Path]], typer.Option("--external", help="Extra dataset in the same CSV format "
                                                           "(repeatable): training rows only, never scored.")] = None,
    upsample: Annotated[int, typer.Option("--upsample", help="Show each training melanoma K times per epoch.")] = 1,
    target: Annotated[Target, typer.Option("--target", help="melanoma (2 classes) or diagnosis (one class per "
                                           "diagnosis; the melanoma probability is scored).")] = Target.melanoma,
    extra_meta: Annotated[bool, typer.Option("--extra-meta/--no-extra-meta", help="Add images per patient and log "
                                             "file size to the metadata.")] = False,
    aug: Annotated[Aug, typer.Option("--aug", help="Augmentation preset (all presets flip and turn).")] = Aug.medium,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Validate and keep an exponential moving average of "
                                                 "the weights with this decay (e.g. 0.999).")] = None,
    swa: Annotated[int, typer.Option("--swa", help="Average the weights of the last N epochs (SWA; batch norm "
                                     "statistics recomputed), validate and keep that average. 0 = off.")] = 0,
    pseudo: Annotated[Optional[Path], typer.Option("--pseudo", help="Pseudo-label CSV from `melafast pseudo`: its "
                                                   "soft-labelled test images join the training folds.")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the backbone (GPU; the first "
                                          "epoch pays minutes of compilation).")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this interrupted run folder with its own "
                                                   "settings (other options but --workers are ignored).")] = None,
):
    """Train a cross-validated fold ensemble; write a run folder with models, metrics, OOF predictions and plots."""
    from ..run import TrainConfig, resume_run, train_run

    if resume is not None:
        result = resume_run(resume, workers=workers, log=typer.echo)
    else:
        cfg = TrainConfig(data=as_str(data), images=as_str(images), arch=arch, size=size, epochs=epochs,
                          freeze_epochs=freeze_epochs, bs=bs, lr=parse_lr(lr), lr_find_on=lr_find_on.value,
                          lr_mult=lr_mult, keep=keep.value, frozen_bn=frozen_bn, folds=folds,
                          fold=parse_fold(fold), meta=meta, meta_dropout=meta_dropout, precision=precision.value, tta=tta, weights=as_str(weights),
                          pretrained=pretrained, seed=seed, deterministic=deterministic, workers=workers, out=as_str(out),
                          on_bad_image=on_bad_image.value, compile=compile,
                          external=[str(p) for p in external or []], upsample=upsample, target=target.value,
                          extra_meta=extra_meta, aug=aug.value, ema=ema, swa=swa, pseudo=as_str(pseudo))
        result = train_run(cfg, log=typer.echo)
    from ..distributed import is_main

    if is_main():
        typer.echo(f"run folder: {result.path}")


@app.command("lr-find")
@friendly
def lr_find(
    data: DataOpt = None,
    images: ImagesOpt = None,
    arch: ArchOpt = "efficientnet_b3",
    size: SizeOpt = 384,
    bs: BsOpt = 64,
    folds: FoldsOpt = 5,
    fold: Annotated[int, typer.Option("--fold", help="Fold whose training split is used.")] = 0,
    lr_find_on: LrFindOnOpt = LrFindOn.frozen,
    meta: MetaOpt = True,
    precision: PrecisionOpt = Precision.auto,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    seed: SeedOpt = 42,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to save the plot.")] = Path("lr_find.png"),
):
    """Run fastai's learning-rate finder on one fold; save the plot and print the suggestions."""
    from ..run import TrainConfig, lr_find_run

    cfg = TrainConfig(data=as_str(data), images=as_str(images), arch=arch, size=size, bs=bs, folds=folds, fold=fold,
                      lr_find_on=lr_find_on.value, meta=meta,
                      precision=precision.value, weights=as_str(weights), pretrained=pretrained, seed=seed, workers=workers)
    lr_find_run(cfg, out=out, log=typer.echo)
