"""PNG plots written into run folders: training curves, ROC curve. Works headless (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_curves", "plot_roc", "plot_pseudo", "save_current_figure", "plot_roc_pr", "plot_reliability", "plot_subgroups",
           "plot_importance", "plot_cam_grid", "plot_roc_overlay", "plot_differences", "plot_audit", "plot_artefacts"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, **kwargs) -> Path:
    "Write `fig` as a PNG atomically (a killed run never leaves half an image) and close it."
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, **kwargs)
    _plt().close(fig)
    return Path(path)


def save_current_figure(path) -> Path:
    """Save matplotlib's current figure (e.g. fastai's lr_find plot) to `path` and close it."""
    return _save(_plt().gcf(), path, bbox_inches="tight")


def plot_curves(metrics: pd.DataFrame, path) -> Path:
    """Train/valid loss and valid AUC per epoch, one line per fold, from a run's per-epoch metric rows."""
    plt = _plt()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, rows in metrics.groupby("fold"):
        x = np.arange(1, len(rows) + 1)
        line = ax_loss.plot(x, rows["train_loss"], label=f"fold {fold} train")[0]
        ax_loss.plot(x, rows["valid_loss"], "--", color=line.get_color(), label=f"fold {fold} valid")
        ax_auc.plot(x, rows["melanoma_auc"], marker="o", color=line.get_color(), label=f"fold {fold}")
    ax_loss.set(xlabel="epoch (frozen epochs first)", ylabel="cross-entropy", title="losses")
    ax_auc.set(xlabel="epoch (frozen epochs first)", ylabel="ROC AUC", title="validation melanoma AUC")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(target, pred, path, title="out-of-fold ROC") -> Path:
    """ROC curve of predictions `pred` against 0/1 `target`, AUC in the legend."""
    from sklearn.metrics import roc_curve

    from ..metrics import auc as roc_auc

    plt = _plt()
    fpr, tpr, _ = roc_curve(target, pred)
    auc = roc_auc(target, pred)
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


def plot_roc_pr(target, pred, points: pd.DataFrame, path) -> Path:
    """ROC curve with the clinical operating points marked, and the precision-recall curve, side by side."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    from ..metrics import auc as roc_auc

    plt = _plt()
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 5))
    fpr, tpr, _ = roc_curve(target, pred)
    ax_roc.plot(fpr, tpr, label=f"AUC = {roc_auc(target, pred):.4f}")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    for p in points.itertuples():
        ax_roc.plot(1 - p.specificity, p.sensitivity, "o", ms=6, label=f"{p.goal}: sens {p.sensitivity:.2f}, "
                    f"spec {p.specificity:.2f} (t = {p.threshold:.3f})")
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, out-of-fold", xlim=(0, 1), ylim=(0, 1.01))
    precision, recall, _ = precision_recall_curve(target, pred)
    ax_pr.plot(recall, precision, label=f"average precision = {average_precision_score(target, pred):.4f}")
    ax_pr.axhline(np.mean(target), ls=":", color="grey", label=f"melanoma rate {np.mean(target):.3f}")
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(bins: pd.DataFrame, ece: float, brier: float, path) -> Path:
    """Reliability diagram: observed melanoma rate against mean predicted probability per bin, images per bin below."""
    plt = _plt()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.plot(bins["mean_pred"], bins["melanoma_rate"], "o-", label=f"model (ECE {ece:.3f}, Brier {brier:.4f})")
    ax.set(ylabel="observed melanoma rate", title="calibration, out-of-fold", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar((bins["lo"] + bins["hi"]) / 2, bins["images"], width=0.09, color="tab:gray")
    ax_n.set(xlabel="predicted melanoma probability", ylabel="images", yscale="log")
    fig.tight_layout()
    return _save(fig, path)


def _interval_rows(table: pd.DataFrame, column: str, extra_height: float):
    "A figure with one row per table row, top down: `column` as a dot with its lo-hi interval (NaN rows left empty)."
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(table) + extra_height))
    y = np.arange(len(table))[::-1]
    ok = table[column].notna().to_numpy()
    v = table[column]
    ax.errorbar(v[ok], y[ok], xerr=[(v - table["lo"])[ok], (table["hi"] - v)[ok]], fmt="o", capsize=3)
    return fig, ax, y, ok


def plot_subgroups(table: pd.DataFrame, overall: dict, path) -> Path:
    """AUC and its bootstrap interval per subgroup (one row each, grouped by variable), the overall AUC dashed."""
    fig, ax, y, ok = _interval_rows(table, "auc", 1.2)
    for yy, row in zip(y[~ok], table[~ok].itertuples()):
        ax.text(0.02, yy, row.note, va="center", fontsize=7, color="tab:gray", transform=ax.get_yaxis_transform())
    ax.axvline(overall["auc"], ls="--", color="tab:red", lw=1)
    ax.set_yticks(y, [f"{r.variable}: {r.group} ({r.images} img, {r.melanomas} mel)" for r in table.itertuples()],
                  fontsize=7)
    low = min(0.5, float(np.nanmin(table["lo"])) - 0.02) if ok.any() else 0.5
    # the overall AUC named in the title, not in a legend box that would cover a row
    ax.set(xlabel="ROC AUC (95% bootstrap interval)", xlim=(max(0.0, low), 1),
           title=f"subgroups (dashed: all images, AUC {overall['auc']:.3f})")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_importance(table: pd.DataFrame, path) -> Path:
    """The AUC drop when each patient field (or every field) is blanked: the path of a patient without it."""
    plt = _plt()
    rows = table[table["field"] != "all fields given"]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2))
    ax.barh(rows["field"], rows["drop"], color=["tab:red" if d < 0 else "tab:blue" for d in rows["drop"]])
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="AUC drop when the field is blanked (red: higher without it)", title="what the metadata adds")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_cam_grid(images, maps, titles, path, title: str = "", ncols: int = 3, vmax: float = 1.0,
                  scale: str | None = None) -> Path:
    """Each image (N, H, W, 3 uint8) as it is, and beside it its class-activation map (N, H, W, 0 to `vmax`) over a
    faded copy, `ncols` pairs a row; each pair titled. `scale`: the colour bar's label, drawn when given (one scale
    for every map of the grid)."""
    plt = _plt()
    vmax = vmax if vmax > 0 else 1.0
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axs = plt.subplots(nrows, 2 * ncols, figsize=(4.4 * ncols, 2.6 * nrows + 0.4), squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    pairs = axs.reshape(nrows, ncols, 2).reshape(-1, 2)
    for (ax_img, ax_cam), img, cam, t in zip(pairs, images, maps, titles):
        ax_img.imshow(img)
        ax_img.set_title(t, fontsize=6.5, loc="left")
        ax_cam.imshow(img, alpha=0.5)
        shown = ax_cam.imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
        ax_cam.set_title("Grad-CAM", fontsize=6.5)
    fig.suptitle(title)
    fig.tight_layout()
    if scale and n:
        bar = fig.colorbar(shown, ax=axs.ravel().tolist(), shrink=0.6, pad=0.01)
        bar.set_label(scale, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return _save(fig, path)


def plot_roc_overlay(target, preds: dict, path, min_tpr: float = 0.8) -> Path:
    """ROC curves of several runs' predictions on the same rows (`preds`: label -> predictions), with the strip
    above `min_tpr` that the partial AUC measures shaded."""
    from sklearn.metrics import roc_curve

    from ..metrics import auc, pauc

    plt = _plt()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 5))
    for label, pred in preds.items():
        fpr, tpr, _ = roc_curve(target, pred)
        text = f"{label}: AUC {auc(target, pred):.4f}, pAUC {pauc(target, pred, min_tpr):.4f}"
        for a in (ax, zoom):
            a.plot(fpr, tpr, label=text, lw=1.4)
    for a, ylim, title in ((ax, (0, 1.01), "ROC, same images"), (zoom, (min_tpr - 0.05, 1.005),
                                                                 f"sensitivity >= {min_tpr:.0%} (the pAUC strip)")):
        a.axhspan(min_tpr, 1, color="tab:gray", alpha=0.08)
        a.plot([0, 1], [0, 1], ":", color="grey")
        a.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=ylim, title=title)
        a.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_differences(table: pd.DataFrame, path, title: str) -> Path:
    """Differences with their intervals, one row each (`label`, `diff`, `lo`, `hi`; NaN rows are left empty), zero
    marked: to the right of zero the second run scores higher."""
    fig, ax, y, _ = _interval_rows(table, "diff", 1.3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, table["label"], fontsize=7)
    ax.set(xlabel="difference (95% paired bootstrap interval)", title=title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_audit(table: pd.DataFrame, path, min_shift: float) -> Path:
    """The shortcut audit at a glance: per artefact, the mean change of the benign lesions' melanoma score (left)
    and the AUC with the artefact on every image against the clean AUC (right), with their intervals; flagged
    artefacts in red; dotted lines at +-`min_shift`, the audit's 'shifts decisions' limit."""
    plt = _plt()

    fig, (ax_b, ax_a) = plt.subplots(1, 2, figsize=(11, 0.55 * len(table) + 1.8), sharey=True)
    y = np.arange(len(table))[::-1]
    colours = ["tab:red" if f else "tab:blue" for f in table["flagged"]]
    for ax, mid, lo, hi in ((ax_b, "benign change", "benign lo", "benign hi"),
                            (ax_a, "AUC with artefact", None, None)):
        if lo is not None:
            err = [table[mid] - table[lo], table[hi] - table[mid]]
        else:  # the AUC's interval: the clean AUC plus the interval of the paired change
            err = [table["AUC change"] - table["AUC lo"], table["AUC hi"] - table["AUC change"]]
        for yi, m, e0, e1, c in zip(y, table[mid], err[0], err[1], colours):
            ax.errorbar(m, yi, xerr=[[max(e0, 0)], [max(e1, 0)]], fmt="o", color=c, capsize=3)
        ax.grid(alpha=0.3, axis="x")
    ax_b.axvline(0, color="grey", lw=1)
    for x in (-min_shift, min_shift):
        ax_b.axvline(x, color="grey", lw=1, ls=":")
    ax_a.axvline(float(table["AUC clean"].iloc[0]), color="grey", lw=1, label="clean images")
    ax_b.set(yticks=y, yticklabels=table["artefact"], xlabel="mean change of the melanoma probability",
             title="benign lesions: score change (dotted: 'shifts decisions')")
    ax_a.set(xlabel="out-of-fold ROC AUC", title="AUC with the artefact on every image (red: flagged)")
    ax_a.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_artefacts(views: list, path) -> Path:
    """A row of images with their titles: (title, H x W x 3 uint8) pairs."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(views), figsize=(2.2 * len(views), 2.5), squeeze=False)
    for ax, (title, img) in zip(axes[0], views):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
