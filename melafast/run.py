"""A cross-validated run folder: train every fold, keep score of them, write the results; resume; lr-find.

The settings are `config.TrainConfig`; training one fold is `fold.train_fold`; this module is the run folder's
bookkeeping: config.json, oof.csv, metrics.csv, results.json, the plots and the CV table.
"""

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

import pandas as pd

from . import __version__
from .config import KEEP_RULES, LR_FIND_ON, TrainConfig, epoch_rule
from .errors import DataError, MelafastError
from .fold import fold_learner, phase_lr_find, seed_everything
from .fold import train_fold as _train_fold  # a module global: the tests interrupt a run through it

__all__ = ["TrainConfig", "RunResult", "resolve_data", "train_run", "resume_run", "lr_find_run", "seed_everything",
           "DEFAULT_DATA", "KEEP_RULES", "LR_FIND_ON", "epoch_rule"]

DEFAULT_DATA = Path("data")  # where users put a Kaggle download; the synthetic sample goes to data/sample


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
    log(f"run folder {run_dir}: {n_main} training images ({int(df['target'].iloc[:n_main].sum())} melanomas) from "
        f"{cfg.data or data}")  # the folder as the user named it; config.json records the full path
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
        learn = fold_learner(df, cfg.fold or 0, cfg, Path(tmp))
        sugg = phase_lr_find(learn, cfg.lr_find_on, (valley, slide, minimum, steep))
    out = Path(out or "lr_find.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_current_figure(out)
    log(f"lr_find on fold {cfg.fold or 0} ({'frozen backbone' if learn.opt.frozen_idx else 'whole network'}), plot: {out}")
    for name, value in sugg._asdict().items():
        log(f"  {name:8s} {value:.2e}")
    return sugg
