"""A cross-validated run folder: train every fold, keep score of them, write the results; resume; lr-find.

The settings are `config.TrainConfig`; training one fold is `fold.train_fold`; the folder's layout and files are
`runfolder.RunFolder`'s; the training table is `table.build_table` (shared with lr-find); this module trains the
folds, and writes the CV figures, the plots and the CV table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from ..config import TrainConfig, epoch_rule
from ..errors import MelafastError
from ..evaluate.figures import HEADLINE, Evaluation
from ..metrics import PAUC_MIN_TPR
from .fold import fold_learner, phase_lr_find
from .fold import train_fold as _train_fold  # a module global: the tests interrupt a run through it
from .table import build_table, versions

__all__ = ["RunResult", "train_run", "resume_run", "lr_find_run"]



@dataclass
class RunResult:
    """What a finished training run gives back (also in its folder)."""

    path: Path  # the run folder
    fold_aucs: dict = field(default_factory=dict)  # fold -> AUC of its out-of-fold predictions (with TTA)
    oof_auc: float = float("nan")  # AUC over all out-of-fold predictions together: honest (last epoch or SWA)
    keep: str = "last"  # the epoch rule the run used
    oof_auc_selected: float | None = None  # with keep="best": the AUC of the kept epochs (optimistic), else None
    oof_auc_no_meta: float | None = None  # with metadata: the OOF AUC with every patient field blanked, else None


def _check(cfg: TrainConfig):
    "Every setting as declared, and an architecture timm knows (with the closest names when it does not)."
    from ..model import check_arch

    cfg.validate()
    check_arch(cfg.arch)


def _cv_table(oof: pd.DataFrame, kept: dict) -> str:
    "The run's figures per fold and over all out-of-fold rows, as printed at the end of training."
    cols = [c for c in ("pred", "pred_no_meta", "pred_selected") if c in oof.columns]
    evs = {c: Evaluation(oof, score=c, n_boot=0, measures=HEADLINE if c == "pred" else HEADLINE[:1]) for c in cols}
    top = "patient_id" in oof.columns  # ISIC 2024's top-15 sensitivity needs each row's patient
    head = f"{'fold':>5} {'images':>7} {'melanomas':>10} {'epoch kept':>11} {'AUC':>8} {'pAUC>80%TPR':>12}"
    head += f" {'top-15 sens':>12}" if top else ""
    head += f" {'AUC, no metadata':>17}" if "pred_no_meta" in cols else ""
    lines = [head + (f" {'AUC at kept epoch (optimistic)':>31}" if "pred_selected" in cols else "")]

    def row(name, n, mel, epoch, f, others):
        return (f"{name:>5} {n:>7} {mel:>10} {epoch:>11} {f['auc']:>8.4f} {f['pauc']:>12.4f}"
                + (f" {f['top15_sens']:>12.3f}" if top else "") + "".join(f" {v:>{w}.4f}" for v, w in others))

    widths = {"pred_no_meta": 17, "pred_selected": 31}
    per_fold = {c: ev.per_fold.set_index("fold") for c, ev in evs.items()}
    for k, f in per_fold["pred"].iterrows():
        lines.append(row(k, int(f["images"]), int(f["melanomas"]), kept[k], f,
                         [(per_fold[c].loc[k, "auc"], widths[c]) for c in cols[1:]]))
    ev = evs["pred"]
    lines.append(row("OOF", ev.n_images, ev.n_melanomas, "", {k: ev.value(k) for k in ("auc", "pauc", "top15_sens")
                                                              if top or k != "top15_sens"},
                     [(evs[c].value("auc"), widths[c]) for c in cols[1:]]))
    return "\n".join(lines)


def train_run(cfg: TrainConfig, log: Callable = print, resume: bool = False) -> RunResult:
    """Train `cfg.folds` fold models (or `cfg.fold` only) and write the run folder (see `RunFolder`): its config,
    the fold models, metrics, out-of-fold predictions, plots and results. Returns the per-fold and overall
    out-of-fold AUCs. With `resume=True` the folds already finished in `cfg.out` are kept and the others trained
    (see `resume_run`).
    """
    from .distributed import barrier, broadcast_object, init_distributed
    from ..processes import is_main
    from ..runfolder import RunFolder

    _check(cfg)
    if init_distributed():
        if cfg.lr is None:
            raise MelafastError("--lr auto is not available with several processes (each would find its own): "
                                "run `melafast lr-find` once and pass --lr")
        if not is_main():
            log = _quiet
            barrier()  # let rank 0 write the sample first, if there is one to write
    if cfg.workers is None:
        cfg.workers = min(8, os.cpu_count() or 1)
    table = build_table(cfg, log)  # rank 0 first: it writes the synthetic sample when there is one to write
    if is_main():
        barrier()
    run = RunFolder(broadcast_object(cfg.out or f"runs/{cfg.arch}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run.path.mkdir(parents=True, exist_ok=True)
    oofs, metrics, kept = run.finished_folds() if resume else ([], [], {})
    if kept:
        log(f"resuming {run.path}: fold(s) {', '.join(map(str, sorted(kept)))} already finished and kept")
    barrier()  # every process has read the finished folds before rank 0 writes anything
    df, n_main = table.df, table.n_main
    if is_main():
        if table.bad is not None and len(table.bad):
            run.write_skipped(table.bad)
            log(f"skipped {len(table.bad)} unusable image(s), listed in {run.skipped_file}: "
                + "; ".join(f"{r.image_name} ({r.problem})" for r in table.bad.head(3).itertuples()))
        if not resume:
            main = df.iloc[:n_main]
            run.write_config(dict(settings=asdict(cfg), data=str(table.data), n_train=n_main,
                                  n_melanoma=int(main["target"].sum()), n_external=table.n_external,
                                  n_pseudo=table.n_pseudo, pseudo_per_fold=table.pseudo_per_fold, versions=versions(),
                                  command=" ".join(sys.argv)))
    log(f"run folder {run.path}: {n_main} training images ({int(df['target'].iloc[:n_main].sum())} melanomas) from "
        f"{cfg.data or table.data}")  # the folder as the user named it; config.json records the full path
    result = _train_folds(df, cfg, run, resume, log, oofs, metrics, kept, table)
    barrier()
    return result


def _quiet(msg):
    pass


def _train_folds(df, cfg, run, resume, log, oofs, metrics, kept, table) -> RunResult:
    "Train the folds not in `kept` yet; rank 0 writes the run folder's CSVs, plots and results as they finish."
    from ..processes import is_main
    from ..evaluate.plots import plot_curves, plot_roc

    from ..progress import RunClock

    log(f"each fold keeps {epoch_rule(cfg.keep, cfg.swa)}")
    nondeterministic = set()
    todo = [k for k in (range(cfg.folds) if cfg.fold is None else [cfg.fold]) if k not in kept]
    clock = RunClock(todo, cfg.freeze_epochs + cfg.epochs)  # "fold 2/5" and the run's time left, on every line
    for k in todo:
        if resume:
            log(f"fold {k} did not finish before: training it from scratch")
        clock.start_fold(k)
        oof, m, kept[k], ops = _train_fold(df, k, cfg, run.path, log, clock=clock)
        clock.end_fold()
        if clock.eta() and clock.position < len(todo):  # the run's time left, between folds too
            log(f"{clock.prefix} done; {clock.eta()}")
        nondeterministic.update(ops)
        if not is_main():
            continue
        oofs.append(oof)
        metrics.append(m)
        run.write_oof(pd.concat(oofs, ignore_index=True).sort_values(["fold"], kind="stable"))
        all_metrics = pd.concat(metrics, ignore_index=True).sort_values(["fold"], kind="stable")
        run.write_metrics(all_metrics[["fold", *m.columns.drop("fold")]])
        plot_curves(all_metrics, run.curves_file)
    if not is_main():
        return RunResult(run.path, keep=cfg.keep)
    oof = pd.concat(oofs, ignore_index=True).sort_values(["fold"], kind="stable")
    if "patient_id" in df.columns:  # the by-patient figures (top-15 sensitivity) need each row's patient
        oof = oof.merge(df[["image_name", "patient_id"]].drop_duplicates("image_name"), on="image_name", how="left")
    ev = Evaluation(oof, n_boot=0)  # point figures: the report and the card add the intervals
    folds = ev.per_fold.set_index("fold")
    result = RunResult(run.path, folds["auc"].to_dict(), ev.value("auc"), keep=cfg.keep)
    results = dict(keep=cfg.keep, epoch_rule=epoch_rule(cfg.keep, cfg.swa), oof_auc=result.oof_auc,
                   fold_aucs=result.fold_aucs, oof_pauc=ev.value("pauc"), fold_paucs=folds["pauc"].to_dict(),
                   pauc_min_tpr=PAUC_MIN_TPR, oof_sens_at_spec90=ev.value("sens_at_spec90"),
                   headline={k: v["value"] for k, v in ev.to_dict()["headline"].items()}, tta=cfg.tta, kept_epochs=kept)
    if "pred_no_meta" in oof.columns and oof["pred_no_meta"].notna().all():  # not in folds saved before it existed
        result.oof_auc_no_meta = _auc(oof, "pred_no_meta")
        results.update(oof_auc_no_meta=result.oof_auc_no_meta, fold_aucs_no_meta=_fold_aucs(oof, "pred_no_meta"),
                       no_meta_note="every patient field blanked at prediction, as for images that come without "
                                    f"metadata (metadata dropout in training: {cfg.meta_dropout}; "
                                    + ("scored by the image-only head" if cfg.image_head else "no image-only head")
                                    + ("; of the saved models, the epochs kept by the joint head's validation AUC: "
                                       "optimistic)" if "pred_selected" in oof.columns else ")"))
    if "pred_selected" in oof.columns and oof["pred_selected"].notna().all():  # not in folds saved before --keep
        result.oof_auc_selected = _auc(oof, "pred_selected")
        results.update(oof_auc_selected=result.oof_auc_selected, fold_aucs_selected=_fold_aucs(oof, "pred_selected"),
                       selected_note="optimistic: each fold's epoch was chosen on the rows these AUCs score")
    if cfg.pseudo and not table.pseudo_per_fold:
        results["cv_note"] = ("optimistic: the pseudo-labels came from the teacher's whole fold ensemble, which saw the "
                              "labels of every fold (make per-fold pseudo-labels with this melafast's `melafast pseudo`)")
    if cfg.deterministic:
        results["nondeterministic_ops"] = sorted(nondeterministic)
    if oof["target"].nunique() == 2:
        plot_roc(oof["target"], oof["pred"], run.roc_file, title=f"{cfg.arch} {cfg.size}px, out-of-fold, TTA x{cfg.tta}")
    run.write_results(results)
    rule = "each fold's last epoch" if cfg.keep == "last" or cfg.swa else "AUC: last epoch, honest"
    note = "; OPTIMISTIC: pseudo-labels from the teacher's whole ensemble" if "cv_note" in results else ""
    log("\nCross-validated melanoma AUC (out-of-fold, dihedral TTA x%d; %s%s)\n%s"
        % (cfg.tta, rule, note, _cv_table(oof, kept)))
    missing = sorted(set(range(cfg.folds)) - {int(k) for k in oof["fold"].unique()})
    if missing:
        log(f"note: the OOF row covers {oof['fold'].nunique()} of the run's {cfg.folds} folds ({len(oof)} images): "
            f"fold(s) {', '.join(map(str, missing))} not trained (--fold); it is not the run's cross-validated figure")
    if cfg.deterministic:
        ops = results["nondeterministic_ops"]
        log("--deterministic: every operation ran a deterministic kernel" if not ops else
            f"--deterministic: torch has no deterministic kernel for {', '.join(ops)}: those ran as they are, so "
            "a rerun may differ in the last digits")
    return result


def _auc(oof: pd.DataFrame, col: str) -> float:
    "The AUC of one score column of the out-of-fold rows."
    return Evaluation(oof, score=col, n_boot=0, measures=HEADLINE[:1]).value("auc")


def _fold_aucs(oof: pd.DataFrame, col: str) -> dict:
    "fold -> the AUC of one score column of its out-of-fold rows."
    ev = Evaluation(oof, score=col, n_boot=0, measures=HEADLINE[:1])
    return ev.per_fold.set_index("fold")["auc"].to_dict()


def resume_run(run_dir, workers: int | None = None, log: Callable = print) -> RunResult:
    """Continue an interrupted `train_run` in `run_dir` with its own saved settings.

    Finished folds are kept; a fold that did not finish is trained again from scratch.
    """
    from ..errors import RunError
    from ..runfolder import RunFolder

    run = RunFolder(run_dir)
    if not run.config_file.is_file():
        raise RunError(f"nothing to resume: {run.config_file} does not exist (is {run_dir} a melafast run folder?)")
    try:
        info = run.info()  # settings it predates: what was in effect then
        cfg = replace(info.settings, data=info.data, out=str(run.path), workers=workers)
    except (KeyError, TypeError, ValueError, MelafastError) as e:
        raise RunError(f"cannot resume {run_dir}: its {run.config_file.name} is damaged or from another version "
                       f"({e})") from None
    return train_run(cfg, log=log, resume=True)


def lr_find_run(cfg: TrainConfig, out=None, log: Callable = print):
    """Run fastai's lr_find on fold 0 of `cfg`'s data and model; save the plot; return the suggestions."""
    from fastai.callback.schedule import minimum, slide, steep, valley

    from ..evaluate.plots import save_current_figure

    _check(cfg)
    table = build_table(cfg, log)  # the rows `train` would use: extra metadata, external and pseudo rows included
    with tempfile.TemporaryDirectory() as tmp:
        learn = fold_learner(table.df, cfg.fold or 0, cfg, Path(tmp))
        sugg = phase_lr_find(learn, cfg.lr_find_on, (valley, slide, minimum, steep))
    out = Path(out or "lr_find.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_current_figure(out)
    log(f"lr_find on fold {cfg.fold or 0} ({'frozen backbone' if learn.opt.frozen_idx else 'whole network'}), plot: {out}")
    for name, value in sugg._asdict().items():
        log(f"  {name:8s} {value:.2e}")
    return sugg
