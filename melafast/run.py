"""Train a cross-validated fold ensemble into a run folder: the library side of `melafast train` and `lr-find`."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import __version__
from .errors import DataError, MelafastError

__all__ = ["TrainConfig", "RunResult", "resolve_data", "train_run", "resume_run", "lr_find_run", "seed_everything",
           "DEFAULT_DATA",
           "KEEP_RULES", "LR_FIND_ON", "epoch_rule"]

DEFAULT_DATA = Path("data")  # where users put a Kaggle download; the synthetic sample goes to data/sample
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
        from .learner import PRECISIONS

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


@dataclass
class RunResult:
    """What a finished training run gives back (also in its folder)."""

    path: Path  # the run folder
    fold_aucs: dict = field(default_factory=dict)  # fold -> AUC of its out-of-fold predictions (with TTA)
    oof_auc: float = float("nan")  # AUC over all out-of-fold predictions together: honest (last epoch or SWA)
    keep: str = "last"  # the epoch rule the run used
    oof_auc_selected: float | None = None  # with keep="best": the AUC of the kept epochs (optimistic), else None


def resolve_data(data=None, log: Callable = print) -> Path:
    """The dataset folder to use: `data`, or `data/sample`; with no `data` given and nothing in data/, the
    synthetic sample is written to data/sample first."""
    from .data import find_dataset, make_sample

    found = find_dataset(data if data is not None else DEFAULT_DATA)
    if found is not None:
        return found.resolve()
    if data is not None:
        raise DataError(f"train.csv not found in {data} (nor in {Path(data) / 'sample'}): point --data at a dataset folder, "
                        "or run `melafast download` / `melafast sample --out PATH`")
    dest = DEFAULT_DATA / "sample"
    log(f"No dataset in {DEFAULT_DATA}/: writing the SYNTHETIC sample to {dest}/ (drawn lesions, not real patients). "
        f"Put a Kaggle download in {DEFAULT_DATA}/ (melafast download) to train on real images.")
    return make_sample(dest).resolve()


def _versions() -> dict:
    import fastai
    import timm
    import torch

    return dict(melafast=__version__, fastai=fastai.__version__, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)")


def _epoch_tracker(keep_best: bool = False):
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import Recorder

    from .averaging import unwrap

    class EpochTracker(Callback):
        "Log every epoch of every fit; with `keep_best`, also copy the weights of the epoch with the best validation AUC."
        order = Recorder.order + 1

        def __init__(self):
            self.rows, self.best_auc, self.best_state, self.best_epoch = [], -np.inf, None, None

        def before_epoch(self):
            self.t0 = time.time()

        def after_epoch(self):
            vals = dict(zip(self.recorder.metric_names[1:], self.learn.final_record))
            frozen = getattr(self.opt, "frozen_idx", 0) > 0
            auc = vals.get("melanoma_auc")
            auc = float(auc) if auc is not None else float("nan")
            epoch = len(self.rows)
            self.rows.append(dict(epoch=epoch, phase="frozen" if frozen else "unfrozen",
                                  train_loss=float(vals["train_loss"]), valid_loss=float(vals["valid_loss"]),
                                  melanoma_auc=auc, seconds=round(time.time() - self.t0, 2)))
            if not keep_best:
                return
            # an undefined AUC (one class in validation) keeps the latest weights until a real AUC appears
            better = auc > self.best_auc if not np.isnan(auc) else np.isneginf(self.best_auc)
            if better:
                self.best_auc = auc if not np.isnan(auc) else -np.inf
                self.best_epoch = epoch
                # the weights that were just validated: the moving average when there is one
                ema = getattr(self.learn, "weight_ema", None)
                state = ema.averaged_state() if ema is not None else unwrap(self.model).state_dict()
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

        @property
        def last_epoch(self):
            return self.rows[-1]["epoch"] if self.rows else None

        def add_validation(self, learn, phase: str, t0: float):
            "Score the model as it is now on the validation set (no TTA) and log it as one more row."
            from .learner import _auc
            from .tta import dihedral_tta

            probs = dihedral_tta(learn, n=1, progress=False).double()
            items, vocab = learn.dls.valid_ds.items, list(learn.dls.vocab)
            labels = items["diagnosis_label"] if "diagnosis_label" in items.columns else items["target"]
            idx = torch.tensor([vocab.index(v) for v in labels])
            loss = float(torch.nn.functional.nll_loss(probs.clamp_min(1e-7).log(), idx))
            auc = _auc(items["target"].to_numpy(), probs[:, learn.metrics[0].pos].numpy())
            self.rows.append(dict(epoch=len(self.rows), phase=phase, train_loss=float("nan"), valid_loss=loss,
                                  melanoma_auc=auc, seconds=round(time.time() - t0, 2)))

        def restore_best(self, model) -> bool:
            "Load the best epoch's weights into `model`; False when no epoch had a defined AUC (nothing to load)."
            if self.best_state is None:
                return False
            model.load_state_dict(self.best_state)
            return True

    return EpochTracker()


def _fit(learn, cfg: TrainConfig, lr: float):
    lr_mult = cfg.lr_mult  # backbone lr = head lr / lr_mult once unfrozen
    if cfg.freeze_epochs > 0:
        if cfg.epochs > 0:
            learn.fine_tune(cfg.epochs, base_lr=lr, freeze_epochs=cfg.freeze_epochs, lr_mult=lr_mult)
        else:
            learn.freeze()
            learn.fit_one_cycle(cfg.freeze_epochs, lr, pct_start=0.99)
    else:
        learn.unfreeze()
        learn.fit_one_cycle(cfg.epochs, slice(lr / 2 / lr_mult, lr / 2), pct_start=0.3, div=5.0)


def seed_everything(seed: int, deterministic: bool = False):
    """Seed Python, numpy and torch. GPUs then autotune their convolutions (cuDNN benchmark), which is fastest but
    not bit-for-bit repeatable; `deterministic` turns on deterministic algorithms instead. The CPU repeats either way.
    """
    import torch
    from fastai.torch_core import set_seed

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    set_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def _fold_learner(df, k, cfg: TrainConfig, path):
    from .data import melanoma_dls
    from .distributed import process_device
    from .learner import melanoma_learner

    seed_everything(cfg.seed, cfg.deterministic)
    dls = melanoma_dls(df, fold=k, size=cfg.size, bs=cfg.bs, meta=cfg.meta, num_workers=cfg.workers,
                       device=process_device(), upsample=cfg.upsample, target=cfg.target, aug=cfg.aug)
    # `path`: where fastai's lr_find puts its temporary checkpoint (instead of a models/ folder in the cwd)
    return melanoma_learner(dls, cfg.arch, meta=cfg.meta, pretrained=cfg.pretrained, weights=cfg.weights,
                            precision=cfg.precision, compile=cfg.compile, frozen_bn=cfg.frozen_bn, path=path,
                            model_dir=".")


def _lr_find(learn, on: str, suggest_funcs):
    "fastai's lr_find on the frozen model (what fine_tune's first phase trains) or the unfrozen one; plots it."
    learn.freeze() if on == "frozen" else learn.unfreeze()
    return learn.lr_find(suggest_funcs=suggest_funcs, show_plot=True)


def _find_lr(learn, png, on: str = "frozen") -> float:
    from fastai.callback.schedule import slide, valley

    from .plots import save_current_figure

    sugg = _lr_find(learn, on, (valley, slide))
    save_current_figure(png)
    return float(sugg.valley)


def _train_fold(df, k, cfg: TrainConfig, run_dir: Path, log: Callable):
    """Train fold `k`; return its OOF rows (`pred`: the honest model's; `pred_selected` with keep="best"), its metric
    rows and the epoch it kept."""
    from .averaging import WeightEMA, WeightSWA, unwrap
    from .checkpoint import save_run
    from .distributed import is_main, to_distributed, world_size

    fold_dir = run_dir / f"fold{k}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    learn = _fold_learner(df, k, cfg, fold_dir)
    lr = cfg.lr if cfg.lr is not None else _find_lr(learn, fold_dir / "lr_find.png", cfg.lr_find_on)
    if world_size() > 1:
        to_distributed(learn)
    log(f"fold {k}: {len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} valid images, lr {lr:.2e}")
    tracker = _epoch_tracker(keep_best=cfg.keep == "best")
    ema = WeightEMA(cfg.ema) if cfg.ema is not None else None
    swa = WeightSWA(cfg.swa) if cfg.swa else None
    cbs = [tracker, *([ema] if ema else []), *([swa] if swa else [])]
    learn.add_cbs(cbs)
    try:
        _fit(learn, cfg, lr)
    finally:
        learn.remove_cbs(cbs)
    kept = tracker.last_epoch
    if swa is not None:  # the average of the last epochs is the model, whatever epoch scored best
        t0 = time.time()
        swa.apply(learn)
        tracker.add_validation(learn, "swa", t0)
        kept = "swa"
    elif ema is not None:  # validation scored the moving average: that is the model
        unwrap(learn.model).load_state_dict(ema.averaged_state())
    oof = pd.DataFrame({"image_name": learn.dls.valid_ds.items["image_name"].to_numpy(),
                        "target": learn.dls.valid_ds.items["target"].to_numpy(), "fold": k,
                        "pred": _valid_preds(learn, cfg.tta)})
    if cfg.keep == "best" and swa is None:
        if tracker.restore_best(unwrap(learn.model)):
            kept = tracker.best_epoch
        oof["pred_selected"] = _valid_preds(learn, cfg.tta)
    if is_main():
        save_run(learn, fold_dir, extra=dict(fold=k, lr=lr, kept_epoch=kept, keep=cfg.keep, seed=cfg.seed,
                                             ema=cfg.ema, swa=cfg.swa, tta=cfg.tta))
    metrics = pd.DataFrame(tracker.rows).assign(fold=k)
    return oof, metrics, kept


def _valid_preds(learn, tta: int):
    "Melanoma probabilities of the validation rows with `tta` dihedral views."
    from .learner import melanoma_probs
    from .tta import dihedral_tta

    return melanoma_probs(dihedral_tta(learn, n=tta), learn.metrics[0].pos)


def _auc(target, pred) -> float:
    from .learner import _auc as auc

    return auc(target, pred)


def _cv_table(oof: pd.DataFrame, kept: dict) -> str:
    selected = "pred_selected" in oof.columns
    head = f"{'fold':>5} {'images':>7} {'melanomas':>10} {'epoch kept':>11} {'AUC':>8}"
    lines = [head + (f" {'AUC at kept epoch (optimistic)':>31}" if selected else "")]

    def row(name, rows, epoch):
        line = f"{name:>5} {len(rows):>7} {int(rows['target'].sum()):>10} {epoch:>11} {_auc(rows['target'], rows['pred']):>8.4f}"
        return line + (f" {_auc(rows['target'], rows['pred_selected']):>31.4f}" if selected else "")

    lines += [row(k, rows, kept[k]) for k, rows in oof.groupby("fold")]
    lines.append(row("OOF", oof, ""))
    return "\n".join(lines)


def _finished_folds(run_dir: Path, log: Callable) -> tuple[list, list, dict]:
    "OOF rows, metric rows and kept epochs of the folds a run folder already completed."
    oof_csv, metrics_csv = run_dir / "oof.csv", run_dir / "metrics.csv"
    if not (oof_csv.is_file() and metrics_csv.is_file()):
        return [], [], {}
    oof, metrics = pd.read_csv(oof_csv), pd.read_csv(metrics_csv)
    oofs, mets, kept = [], [], {}
    for k, rows in oof.groupby("fold"):
        fold_dir = run_dir / f"fold{k}"
        if not ((fold_dir / "model.safetensors").is_file() and (fold_dir / "config.json").is_file()):
            continue
        oofs.append(rows)
        mets.append(metrics[metrics["fold"] == k])
        fold_cfg = json.loads((fold_dir / "config.json").read_text())
        kept[int(k)] = fold_cfg.get("kept_epoch", fold_cfg.get("best_epoch"))  # best_epoch: saved before --keep
    if kept:
        log(f"resuming {run_dir}: fold(s) {', '.join(map(str, sorted(kept)))} already finished and kept")
    return oofs, mets, kept


def train_run(cfg: TrainConfig, log: Callable = print, resume: bool = False) -> RunResult:
    """Train `cfg.folds` fold models (or `cfg.fold` only) and write the run folder:

    config.json, fold*/{model.safetensors, config.json[, lr_find.png]}, metrics.csv, oof.csv,
    curves.png, roc.png, results.json. Returns the per-fold and overall out-of-fold AUCs.
    With `resume=True` the folds already finished in `cfg.out` are kept and the others trained (see `resume_run`).
    """
    from .checkpoint import write_csv, write_json
    from .data import add_external, add_meta_features, add_pseudo, check_images, load_competition, make_folds, read_pseudo
    from .distributed import barrier, broadcast_object, init_distributed, is_main

    cfg.validate()
    if init_distributed():
        if cfg.lr is None:
            raise MelafastError("--lr auto is not available with several processes (each would find its own): "
                                "run `melafast lr-find` once and pass --lr")
        if not is_main():
            log = _quiet
            barrier()  # let rank 0 write the sample first, if there is one to write
    if cfg.workers is None:
        cfg.workers = min(8, os.cpu_count() or 1)
    data = resolve_data(cfg.data, log)
    if is_main():
        barrier()
    train, test = load_competition(data, images=cfg.images)
    train, bad = check_images(train, cfg.on_bad_image, workers=max(cfg.workers, 2))
    df = make_folds(add_meta_features(train) if cfg.extra_meta else train, n_folds=cfg.folds, seed=cfg.seed)
    n_main = len(df)
    for path in cfg.external:
        ext, _ = load_competition(path)
        ext, ext_bad = check_images(ext, cfg.on_bad_image, workers=max(cfg.workers, 2))
        ext = add_meta_features(ext) if cfg.extra_meta else ext
        df, n_dup = add_external(df, ext)
        log(f"external data {path}: {len(ext) - n_dup} training rows added ({int(ext['target'].sum())} melanomas in "
            f"the file), {n_dup} already present dropped" + (f", {len(ext_bad)} unusable images skipped" if len(ext_bad) else ""))
    n_external = len(df) - n_main
    if cfg.pseudo:
        table = read_pseudo(cfg.pseudo)
        if test is not None:
            test = add_meta_features(test) if cfg.extra_meta else test  # per-patient counts over the whole test set
            test = test[test["image_name"].isin(table["image_name"])]
            test, test_bad = check_images(test, cfg.on_bad_image, workers=max(cfg.workers, 2))
            table = table[~table["image_name"].isin(test_bad["image_name"])]
        n_before = len(df)
        df = add_pseudo(df, test, table)
        pseudo = df.iloc[n_before:]
        log(f"pseudo-labels {cfg.pseudo}: {len(pseudo)} soft-labelled test images join the training folds "
            f"(mean soft target {pseudo['soft_target'].mean():.3f}; {int((pseudo['soft_target'] >= 0.5).sum())} "
            "above 0.5); validation keeps the labelled images only")
    run_dir = Path(broadcast_object(cfg.out or f"runs/{cfg.arch}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    oofs, metrics, kept = _finished_folds(run_dir, log) if resume else ([], [], {})
    barrier()  # every process has read the finished folds before rank 0 writes anything
    if is_main():
        if len(bad):
            write_csv(bad, run_dir / "skipped_images.csv")
            log(f"skipped {len(bad)} unusable image(s), listed in {run_dir / 'skipped_images.csv'}: "
                + "; ".join(f"{r.image_name} ({r.problem})" for r in bad.head(3).itertuples()))
        if not resume:
            main = df.iloc[:n_main]
            write_json(dict(settings=asdict(cfg), data=str(data), n_train=n_main, n_melanoma=int(main["target"].sum()),
                            n_external=n_external, n_pseudo=len(df) - n_main - n_external, versions=_versions(),
                            command=" ".join(sys.argv)),
                       run_dir / "config.json")
    log(f"run folder {run_dir}: {n_main} training images ({int(df['target'].iloc[:n_main].sum())} melanomas) from {data}")
    result = _train_folds(df, cfg, run_dir, resume, log, oofs, metrics, kept)
    barrier()
    return result


def _quiet(msg):
    pass


def _train_folds(df, cfg, run_dir, resume, log, oofs, metrics, kept) -> RunResult:
    "Train the folds not in `kept` yet; rank 0 writes the run folder's CSVs, plots and results as they finish."
    from .checkpoint import write_csv, write_json
    from .distributed import is_main
    from .plots import plot_curves, plot_roc

    log(f"each fold keeps {epoch_rule(cfg.keep, cfg.swa)}")
    for k in range(cfg.folds) if cfg.fold is None else [cfg.fold]:
        if k in kept:
            continue
        if resume:
            log(f"fold {k} did not finish before: training it from scratch")
        oof, m, kept[k] = _train_fold(df, k, cfg, run_dir, log)
        if not is_main():
            continue
        oofs.append(oof)
        metrics.append(m)
        write_csv(pd.concat(oofs, ignore_index=True).sort_values(["fold"], kind="stable"), run_dir / "oof.csv")
        all_metrics = pd.concat(metrics, ignore_index=True).sort_values(["fold"], kind="stable")
        write_csv(all_metrics[["fold", *m.columns.drop("fold")]], run_dir / "metrics.csv")
        plot_curves(all_metrics, run_dir / "curves.png")
    if not is_main():
        return RunResult(run_dir, keep=cfg.keep)
    oof = pd.concat(oofs, ignore_index=True).sort_values(["fold"], kind="stable")
    result = RunResult(run_dir, _fold_aucs(oof, "pred"), _auc(oof["target"], oof["pred"]), keep=cfg.keep)
    results = dict(keep=cfg.keep, epoch_rule=epoch_rule(cfg.keep, cfg.swa), oof_auc=result.oof_auc,
                   fold_aucs=result.fold_aucs, tta=cfg.tta, kept_epochs=kept)
    if "pred_selected" in oof.columns and oof["pred_selected"].notna().all():  # not in folds saved before --keep
        result.oof_auc_selected = _auc(oof["target"], oof["pred_selected"])
        results.update(oof_auc_selected=result.oof_auc_selected, fold_aucs_selected=_fold_aucs(oof, "pred_selected"),
                       selected_note="optimistic: each fold's epoch was chosen on the rows these AUCs score")
    if oof["target"].nunique() == 2:
        plot_roc(oof["target"], oof["pred"], run_dir / "roc.png", title=f"{cfg.arch} {cfg.size}px, out-of-fold, TTA x{cfg.tta}")
    write_json(results, run_dir / "results.json")
    log("\nCross-validated melanoma AUC (out-of-fold, dihedral TTA x%d; %s)\n%s"
        % (cfg.tta, "each fold's last epoch" if cfg.keep == "last" or cfg.swa else "AUC: last epoch, honest", _cv_table(oof, kept)))
    return result


def _fold_aucs(oof: pd.DataFrame, col: str) -> dict:
    return {int(k): _auc(r["target"], r[col]) for k, r in oof.groupby("fold")}


def resume_run(run_dir, workers: int | None = None, log: Callable = print) -> RunResult:
    """Continue an interrupted `train_run` in `run_dir` with its own saved settings.

    Finished folds are kept; a fold that did not finish is trained again from scratch.
    """
    from .errors import RunError

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    try:
        saved = json.loads(cfg_file.read_text())
        settings = dict(saved["settings"])
        settings.update(data=saved["data"], out=str(run_dir), workers=workers)
        if "lr_mult" not in settings:  # saved before --lr-mult existed: pretrained backbones then trained at lr/100
            settings["lr_mult"] = 100.0 if settings.get("pretrained", True) or settings.get("weights") else 1.0
        settings.setdefault("keep", "best")  # saved before --keep existed: folds then kept their best epoch
        settings.setdefault("frozen_bn", False)  # and frozen epochs let batch-norm statistics move
        cfg = TrainConfig(**settings)
    except FileNotFoundError:
        raise RunError(f"nothing to resume: {cfg_file} does not exist (is {run_dir} a melafast run folder?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"cannot resume {run_dir}: its config.json is damaged or from another version ({e})") from None
    return train_run(cfg, log=log, resume=True)


def lr_find_run(cfg: TrainConfig, out=None, log: Callable = print):
    """Run fastai's lr_find on fold 0 of `cfg`'s data and model; save the plot; return the suggestions."""
    from fastai.callback.schedule import minimum, slide, steep, valley

    from .data import load_competition, make_folds
    from .plots import save_current_figure

    cfg.validate()
    data = resolve_data(cfg.data, log)
    train, _ = load_competition(data, images=cfg.images)
    df = make_folds(train, n_folds=cfg.folds, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        learn = _fold_learner(df, cfg.fold or 0, cfg, Path(tmp))
        sugg = _lr_find(learn, cfg.lr_find_on, (valley, slide, minimum, steep))
    out = Path(out or "lr_find.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_current_figure(out)
    log(f"lr_find on fold {cfg.fold or 0} ({'frozen backbone' if learn.opt.frozen_idx else 'whole network'}), plot: {out}")
    for name, value in sugg._asdict().items():
        log(f"  {name:8s} {value:.2e}")
    return sugg
