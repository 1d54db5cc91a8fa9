"""The worst errors, explained: the report's galleries (the melanomas scored lowest, the benign lesions scored highest,
other malignant lesions apart), one image per lesion, each beside the Grad-CAM map of the fold model that scored it."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..metrics import diagnoses
from .figures import SITE
from .pages import image, note, para

__all__ = ["galleries", "error_section", "NOT_BENIGN"]


def _describe(row) -> str:
    age = "?" if pd.isna(row.get("age_approx")) else f"{row['age_approx']:.0f}"
    return f"{row.get('sex') if isinstance(row.get('sex'), str) else '?'}, {age}, " \
           f"{row.get(SITE) if isinstance(row.get(SITE), str) else '?'}"


# diagnoses that are not benign although the melanoma target calls them 0 (HAM10000 even files them as "benign"):
# a high score on one of these is not a false alarm a dermatologist would accept
NOT_BENIGN = ("basal cell carcinoma", "squamous cell carcinoma", "intraepithelial carcinoma", "actinic keratosis",
              "bowen", "merkel", "kaposi", "atypical melanocytic proliferation", "carcinoma", "melanoma")


def galleries(df: pd.DataFrame, n: int) -> dict:
    """The error galleries: the `n` melanomas scored lowest, the `n` benign lesions scored highest and, when the data
    names them, the `n` other (non-melanoma) malignant or premalignant lesions scored highest; one image per lesion
    (`lesion_id`) or patient (`patient_id`; a row without either stands alone), the most extreme image of each; in
    each gallery grouped by diagnosis, most extreme first. Returns name -> (title, rows with a `diagnosis` column)."""
    df = df.assign(diagnosis=diagnoses(df))
    key = next((c for c in ("lesion_id", "patient_id") if c in df.columns), None)
    who = df[key].astype(object).where(df[key].notna(), "row " + df.index.astype(str)) if key else df.index.to_series()
    df = df.assign(_who=who.to_numpy())
    not_benign = df["diagnosis"].str.contains("|".join(NOT_BENIGN), regex=True)
    picks = {"missed_melanomas": ("melanomas scored lowest", df[df["target"] == 1], True),
             "false_alarms": ("benign lesions scored highest", df[(df["target"] == 0) & ~not_benign], False),
             "other_malignant": ("other malignant or premalignant lesions (not melanoma) scored highest",
                                 df[(df["target"] == 0) & not_benign], False)}
    out = {}
    for name, (title, rows, lowest) in picks.items():
        if rows.empty:
            continue
        rows = rows.sort_values("pred", ascending=lowest, kind="mergesort").drop_duplicates("_who").head(n)
        worst = rows.groupby("diagnosis")["pred"].transform("min" if lowest else "max")  # diagnosis groups, worst first
        rows = rows.assign(_g=worst if lowest else -worst, _p=rows["pred"] if lowest else -rows["pred"])
        out[name] = (title, rows.sort_values(["_g", "diagnosis", "_p"], kind="mergesort").drop(columns=["_g", "_p", "_who"]))
    return out


def error_section(models, df, figdir, n_errors, bs, num_workers, device, precision=None,
                  scored_by: str = "the fold model that scored it") -> str:
    """The report's section on the worst errors: galleries by diagnosis, each image beside its Grad-CAM map from the
    model of its row's `fold` (`scored_by` says which, in words)."""
    from .explain import describe_cam_layer
    from ..inference import resolve_settings
    from .plots import plot_cam_grid

    used = sorted({resolve_settings(m.spec, device, precision).describe() for m in models.values()}) or ["fp32"]
    layers = sorted({describe_cam_layer(m.model, m.spec.size) for m in models.values()})
    chosen = galleries(df, n_errors)
    parts = [para("The melanomas scored lowest and the lesions scored highest that are not melanomas, one image per "
                + ("lesion" if "lesion_id" in df.columns else "patient") + " (its most extreme), grouped by diagnosis "
                "where the data gives one. Each image is shown as it is and beside its Grad-CAM map for the melanoma "
                f"output of {scored_by} (red: regions that raise the melanoma score), with its "
                "metadata (sex, age, site) and its score."),
             para(f"The maps are taken at {' / '.join(layers)} and scaled up to the image; they explain the plain view "
                "of the image, while the score is the mean over the run's TTA views. The maps were computed "
                f"in {' / '.join(used)}: each model's own precision and layout, as its out-of-fold scores were."),
             para("All the maps of a gallery share one colour scale (the bar beside it): a faint map is an image the "
                  "model found little to raise its score on, not one drawn as hot as the others. What a map can "
                  "show: where, at that layer's grid, the features that raise the melanoma score sit. What it "
                  "cannot: why, which colour or texture there, or whether the model is right; a coarse grid "
                  "blurs small structures, and a map on the skin or a corner rather than the lesion is a warning "
                  "sign (see the shortcut audit).")]
    if "other_malignant" in chosen:
        parts.append(para("Lesions whose diagnosis is malignant or premalignant but not melanoma (e.g. basal cell "
                        "carcinoma) count as 0 for the melanoma target; they have their own gallery, apart from the "
                        "benign lesions, since a high score on them is not a false alarm."))
    for name, (title, rows) in chosen.items():
        imgs, maps, warning = _cams(models, rows, device, precision)
        titles = [f"{r.image_name}\n{r.diagnosis} · {r.pred:.3f}\n{_describe(r._asdict())}" for r in rows.itertuples()]
        counts = rows["diagnosis"].value_counts(sort=False)
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(para("By diagnosis: " + ", ".join(f"{d} {c}" for d, c in counts.items()) + "."))
        if warning:
            parts.append(note(warning))
        vmax = max((float(np.max(m)) for m in maps if m is not None), default=1.0)
        parts.append(image(plot_cam_grid(imgs, maps, titles, figdir / f"{name}.png", title=title, vmax=vmax,
                                         scale="Grad-CAM, one scale for this gallery")))
    return "\n".join(parts)


def _cams(models, rows, device, precision=None) -> tuple[list, list, str]:
    "Images (uint8, as the model saw them) and Grad-CAM maps of `rows`, each by its own fold's model."
    from ..errors import MelafastError
    from .explain import grad_cam
    from ..inference import model_batch

    imgs, maps, warning = [None] * len(rows), [None] * len(rows), ""
    for k, part in rows.reset_index(drop=True).groupby("fold"):
        p = models[int(k)]
        s, img, meta = model_batch(p, part, device, precision)
        try:
            with s.autocast():
                cams = grad_cam(p.model, img, meta, p.spec.pos, normalize=False)
        except MelafastError as e:
            cams, warning = np.zeros(img.shape[:1] + img.shape[2:]), f"no Grad-CAM: {e}"
        pixels = (img.permute(0, 2, 3, 1).clamp(0, 1) * 255).byte().cpu().numpy()
        for j, i in enumerate(part.index):
            imgs[i], maps[i] = pixels[j], cams[j]
    return imgs, maps, warning
