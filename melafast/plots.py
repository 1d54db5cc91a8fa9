"""PNG plots written into run folders: training curves, ROC curve. Works headless (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_curves", "plot_roc", "plot_pseudo", "save_current_figure"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, **kwargs) -> Path:
    "Write `fig` as a PNG atomically (a killed run never leaves half an image) and close it."
    from .checkpoint import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, **kwargs)
    _plt().close(fig)
    return Path(path)


def save_current_figure(path) -> Path:
    """Save matplotlib's current figure (e.g. fastai's lr_find plot) to `path` and close it."""
    return _save(_plt().gcf(), path, bbox_inches="tight")


def plot_curves(metrics: pd.DataFrame, path) -> Path:
    """Train/valid loss and valid AUC per epoch, one line per fold, from a run's metrics.csv rows."""
    plt = _plt()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, rows in metrics.groupby("fold"):
        x = np.arange(1, len(rows) + 1)
        line = ax_loss.plot(x, rows["train_loss"], label=f"fold {fold} train")[0]
        ax_loss.plot(x, rows["valid_loss"], "--", color=line.get_color(), label=f"fold {fold} valid")
        ax_auc.plot(x, rows["melanoma_auc"], marker="o", color=line.get_color(), label=f"fold {fold}")
    ax_loss.set(xlabel="epoch (frozen epochs first)", ylabel="cross-entropy", title="losses")
    ax_auc.set(xlabel="epoch (frozen epochs first)", ylabel="ROC AUC", title="validation melanoma AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(target, pred, path, title="out-of-fold ROC") -> Path:
    """ROC curve of predictions `pred` against 0/1 `target`, AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fpr, tpr, _ = roc_curve(target, pred)
    auc = roc_auc_score(target, pred)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {auc:.4f} (n = {len(target)}, {int(np.sum(target))} melanomas)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pseudo(pred, keep, low: float, high: float, path) -> Path:
    """Histogram of test-set melanoma probabilities: kept (pseudo-labelled) vs left out, thresholds dashed."""
    plt = _plt()
    pred, keep = np.asarray(pred, dtype=np.float64), np.asarray(keep, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 51)
    ax.hist([pred[keep], pred[~keep]], bins=bins, stacked=True, color=["tab:blue", "tab:gray"],
            label=[f"pseudo-labelled ({int(keep.sum())})", f"left out ({int((~keep).sum())})"])
    for x in (low, high):
        ax.axvline(x, color="tab:red", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set(xlabel="predicted melanoma probability (test images)", ylabel="images", title="pseudo-labels")
    ax.legend()
    return _save(fig, path, bbox_inches="tight")
