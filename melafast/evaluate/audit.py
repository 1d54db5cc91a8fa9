"""`melafast audit`: does the run score artefacts instead of lesions?

Dermoscopy models are known to learn what surrounds a lesion: surgical-ink markings (drawn around suspicious
lesions before excision), rulers, the dark corners of a dermatoscope's field of view, hair, colour calibration
patches. The audit draws each artefact synthetically onto every out-of-fold image, exactly where and as the
recorded parameters say, has the fold model that scored the image score it again, and measures how far the
melanoma score moves: its mean change on benign lesions (a rise means false alarms caused by the artefact) and the
out-of-fold AUC with the artefact on every image, both with patient-bootstrap intervals.

An artefact is flagged when the AUC with it on every image falls by at least `min_auc_drop`, the interval of the
fall clear of zero: the artefact then changes how the model ranks lesions, which is what a learned shortcut does
(benign lesions given the artefact overtake melanomas). A model that merely reacts to any dark mark moves all scores
alike and keeps its ranking; its benign lesions' scores still move, which changes the decisions at a fixed
threshold: `shifts decisions` marks a mean benign change of at least `min_shift` with its interval clear of zero.

A coloured artefact (ink, patch) is also drawn in the grey of its own luminance, and scored again: the difference is
what its colour alone does. It is flagged too when its colour raises the benign lesions' scores, or lowers the
melanomas', by at least `min_shift` with the interval clear of zero: a model that learnt violet ink reacts to the
violet, while one that reacts to any dark mark moves alike for the grey marks.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..errors import MelafastError, RunError

__all__ = ["ARTEFACTS", "draw_artefact", "shortcut_audit", "audit_run", "MIN_SHIFT", "MIN_AUC_DROP"]

MIN_SHIFT = 0.05  # a mean change of the benign lesions' melanoma probability this large "shifts decisions"
MIN_AUC_DROP = 0.05  # an AUC fall this large (artefact on every image, interval below zero) is flagged

# what each artefact looks like: sizes are shares of the image side, so that the drawing scales with the input
ARTEFACTS = {
    "ink": dict(what="surgical-ink marking: a gentian-violet arc around the lesion, as drawn before an excision",
                coloured=True, colour=(105, 45, 150), opacity=0.85, radius=(0.30, 0.42), width=0.05, arc_degrees=(90, 200)),
    "ruler": dict(what="a ruler along one edge of the image: a pale strip with dark millimetre ticks",
                  colour=(235, 235, 225), tick_colour=(30, 30, 30), width=0.10, tick_every=0.035),
    "vignette": dict(what="the dark round edge of a dermatoscope's field of view, blacking out the corners",
                     radius=(0.47, 0.56), softness=0.04, darkness=0.92),
    "hair": dict(what="dark hairs across the image", count=(4, 9), colour=(45, 32, 25), width=0.012),
    "patch": dict(what="a colour calibration patch in a corner: four coloured squares", coloured=True,
                  size=0.16, colours=((200, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 40))),
}


def _check(names) -> list:
    names = list(ARTEFACTS) if names is None else [str(n).strip().lower() for n in names]
    bad = [n for n in names if n not in ARTEFACTS]
    if bad or not names:
        raise MelafastError(f"unknown artefact {', '.join(map(repr, bad)) or '(none given)'}: choose from "
                            f"{', '.join(ARTEFACTS)}")
    return list(dict.fromkeys(names))


def draw_artefact(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """`img` (H, W, 3 uint8) with the artefact `name` drawn on it, placed by `rng` within the ranges of
    `ARTEFACTS[name]`; a new array."""
    from PIL import Image, ImageDraw

    p, (h, w) = ARTEFACTS[_check([name])[0]], img.shape[:2]
    side = min(h, w)
    out = Image.fromarray(img)
    if name == "ink":
        r = rng.uniform(*p["radius"]) * side
        start = rng.uniform(0, 360)
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).arc([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], start,
                                  start + rng.uniform(*p["arc_degrees"]), fill=(*p["colour"], int(255 * p["opacity"])),
                                  width=max(2, round(p["width"] * side)))
        out = Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")
    elif name == "ruler":
        d, strip = ImageDraw.Draw(out), max(3, round(p["width"] * side))
        edge, step = rng.integers(4), max(2.0, p["tick_every"] * side)
        horizontal = edge < 2
        length = w if horizontal else h
        at = 0 if edge % 2 == 0 else (h if horizontal else w) - strip
        box = [0, at, w, at + strip] if horizontal else [at, 0, at + strip, h]
        d.rectangle(box, fill=p["colour"])
        for i, x in enumerate(np.arange(rng.uniform(0, step), length, step)):
            tick = strip * (0.8 if i % 5 == 0 else 0.45)
            near = at if edge % 2 == 0 else at + strip - tick
            d.line([x, near, x, near + tick] if horizontal else [near, x, near + tick, x], fill=p["tick_colour"],
                   width=max(1, round(side / 200)))
    elif name == "vignette":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / side
        edge = rng.uniform(*p["radius"])
        dark = np.clip((r - edge) / p["softness"], 0, 1)[..., None] * p["darkness"]
        return (img.astype(np.float32) * (1 - dark)).round().astype(np.uint8)
    elif name == "hair":
        d = ImageDraw.Draw(out)
        for _ in range(rng.integers(p["count"][0], p["count"][1] + 1)):
            (x0, y0), (x1, y1), (cx, cy) = rng.uniform(0, 1, (3, 2)) * [w, h]
            t = np.linspace(0, 1, 24)[:, None]
            curve = (1 - t) ** 2 * [x0, y0] + 2 * t * (1 - t) * [cx, cy] + t ** 2 * [x1, y1]
            d.line([tuple(q) for q in curve], fill=p["colour"], width=max(1, round(p["width"] * side)))
    elif name == "patch":
        d, s = ImageDraw.Draw(out), max(4, round(p["size"] * side))
        corner = rng.integers(4)
        x0, y0 = (1 if corner % 2 == 0 else w - s - 1), (1 if corner < 2 else h - s - 1)
        half = s / 2
        for i, colour in enumerate(p["colours"]):
            dx, dy = (i % 2) * half, (i // 2) * half
            d.rectangle([x0 + dx, y0 + dy, x0 + dx + half - 1, y0 + dy + half - 1], fill=colour)
    return np.asarray(out, dtype=np.uint8).copy()


def _code(name: str) -> int:
    "The artefact's place in `ARTEFACTS`: with the seed and the image it seeds the drawing (the same in any subset)."
    return list(ARTEFACTS).index(name) + 1


def in_grey(img: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """The control of a coloured artefact: `drawn`'s changed pixels in the grey of their own luminance, the same marks
    without their colour."""
    changed = np.any(drawn != img, axis=-1, keepdims=True)
    grey = (drawn.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
    return np.where(changed, grey[..., None], drawn)


def _with_artefact(img: torch.Tensor, variant, seed: int, index: np.ndarray) -> torch.Tensor:
    """A batch (N, 3, H, W, floats in [0, 1]) with the artefact `variant` = (name, grey) drawn on image i by its own
    generator (seed, the artefact, index[i]); `grey`: its grey control. None: the batch as it is."""
    if variant is None:
        return img
    name, grey = variant
    pixels = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    drawn = []
    for px, i in zip(pixels, index):
        d = draw_artefact(px, name, np.random.default_rng([seed, _code(name), int(i)]))
        drawn.append(in_grey(px, d) if grey else d)
    return torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).to(img.device, img.dtype) / 255


def _column(variant) -> str:
    return "clean" if variant is None else variant[0] + (" in grey" if variant[1] else "")


def _scores(models: dict, df: pd.DataFrame, names: list, seed: int, tta: int, bs: int, num_workers, device,
            precision, progress: bool) -> pd.DataFrame:
    """The melanoma probability of each row by its fold's model: plain (`clean`), with each artefact drawn, and for a
    coloured artefact with the same marks in grey (`<name> in grey`)."""
    from ..data import inference_dl
    from ..inference.inputs import model_table
    from ..inference.settings import prepare_model, resolve_settings
    from ..progress import progress as shown
    from ..inference.tta import dihedral_view, dihedral_views

    variants = [None] + [(n, g) for n in names for g in ((False, True) if ARTEFACTS[n].get("coloured") else (False,))]
    out = pd.DataFrame(index=df.index, columns=[_column(v) for v in variants], dtype=np.float64)
    for k, part in df.groupby("fold"):
        if int(k) not in models:
            raise RunError(f"fold {k} of the out-of-fold predictions has no saved model: the audit rescores each image "
                           "with the model that scored it")
        p = models[int(k)]
        s = resolve_settings(p.spec, device, precision)
        prepare_model(p.model, s)
        rows = model_table([p], part)
        dl = inference_dl(rows, p.spec.size, p.meta_proc, bs=bs, num_workers=num_workers, device=s.device)
        pos, start, got = p.spec.pos, 0, {_column(v): [] for v in variants}
        with torch.inference_mode():
            for batch in shown(dl, total=len(dl), label=f"audit fold {k}", size=lambda b: len(b[0]), display=progress):
                img = batch[0].as_subclass(torch.Tensor).to(s.device)
                meta = batch[1].as_subclass(torch.Tensor).to(s.device) if len(batch) > 1 else None
                index = part.index.to_numpy()[start:start + len(img)]
                start += len(img)
                for variant in variants:
                    drawn = _with_artefact(img, variant, seed, index)
                    total = 0.0
                    for view in dihedral_views(tta):
                        with s.autocast():
                            total = total + torch.softmax(p.model(dihedral_view(drawn, view), meta).float(), -1)[:, pos]
                    got[_column(variant)].append((total / tta).cpu().numpy())
        for column, values in got.items():
            out.loc[part.index, column] = np.concatenate(values)
    return out


def _mean_interval(values, groups, n_boot, seed, level=0.95) -> tuple[float, float, float]:
    "Mean of `values` with a percentile bootstrap interval over whole groups (rows without one stand alone)."
    from ..metrics import bootstrap_weights

    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return (np.nan, np.nan, np.nan)
    means = [np.sum(w * values) / np.sum(w) for w in bootstrap_weights(groups, len(values), n_boot, seed) if np.sum(w) > 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(values.mean()), float(lo), float(hi)


def shortcut_audit(models: dict, df: pd.DataFrame, artefacts=None, n_boot: int = 1000, seed: int = 0, tta: int = 1,
                   bs: int = 64, num_workers: int | None = None, device=None, precision: str | None = None,
                   min_shift: float = MIN_SHIFT, min_auc_drop: float = MIN_AUC_DROP,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Audit the fold models `models` ({fold: Predictor}) on the rows of `df` (out-of-fold rows with `fold`, `target`,
    `fname`, the metadata, and `patient_id` when known): each artefact drawn on every image (see `draw_artefact`;
    image i's placement comes from the generator seeded with (seed, artefact, i)), each image rescored by its
    fold's model (TTA `tta`, 1: the plain view). Returns (one row per artefact: mean change of the melanoma score on
    benign lesions and on melanomas, AUC clean and with the artefact, the change with a paired patient bootstrap
    interval, `flagged` and `shifts decisions` (see the module's doc); the scores, one column per variant)."""
    from ..metrics import paired_bootstrap

    names = _check(artefacts)
    if df.empty or df["target"].nunique() < 2:
        raise RunError("the audit needs out-of-fold melanomas and benign lesions")
    df = df.reset_index(drop=True)
    scores = _scores(models, df, names, seed, tta, bs, num_workers, device, precision, progress)
    groups = df["patient_id"] if "patient_id" in df.columns else None
    benign, mel = (df["target"] == 0).to_numpy(), (df["target"] == 1).to_numpy()
    rows = []
    for name in names:
        change = (scores[name] - scores["clean"]).to_numpy()
        b = _mean_interval(change[benign], None if groups is None else groups[benign], n_boot, seed)
        m = _mean_interval(change[mel], None if groups is None else groups[mel], n_boot, seed)
        pb = paired_bootstrap(df["target"], scores["clean"], scores[name], groups, n_boot=n_boot, seed=seed,
                              with_pauc=False).iloc[0]
        shift = bool(abs(b[0]) >= min_shift and (b[1] > 0 or b[2] < 0))
        fall = bool(-pb["diff"] >= min_auc_drop and pb["hi"] < 0)
        row = {"artefact": name, "benign change": b[0], "benign lo": b[1], "benign hi": b[2],
               "melanoma change": m[0], "melanoma lo": m[1], "melanoma hi": m[2], "AUC clean": pb["a"],
               "AUC with artefact": pb["b"], "AUC change": pb["diff"], "AUC lo": pb["lo"], "AUC hi": pb["hi"]}
        colour = np.nan
        if f"{name} in grey" in scores.columns:  # what the colour adds to the same marks in grey
            part = (scores[name] - scores[f"{name} in grey"]).to_numpy()
            cb = _mean_interval(part[benign], None if groups is None else groups[benign], n_boot, seed)
            cm = _mean_interval(part[mel], None if groups is None else groups[mel], n_boot, seed)
            row.update({"benign change, colour": cb[0], "colour lo": cb[1], "colour hi": cb[2],
                        "melanoma change, colour": cm[0]})
            # the colour alone raises benign scores (false alarms) or lowers melanoma scores (misses)
            colour = bool((cb[0] >= min_shift and cb[1] > 0) or (cm[0] <= -min_shift and cm[2] < 0))
        rows.append({**row, "flagged": fall or colour is True, "shifts decisions": shift})
    return pd.DataFrame(rows), scores


def _examples(df, names, seed, size, path) -> Path:
    "One out-of-fold image as the model sees it, plain and with each artefact drawn: what the audit draws."
    from PIL import Image

    from ..data.store import open_image
    from .plots import plot_artefacts

    row = df.iloc[int(np.argmax(df["target"].to_numpy() == 0))]
    img = np.asarray(Image.open(open_image(row["fname"])).convert("RGB").resize((size, size)), dtype=np.uint8)
    index = int(df.index[df["image_name"] == row["image_name"]][0])
    views = [("as scored", img)] + [(n, draw_artefact(img, n, np.random.default_rng([seed, c + 1, index])))
                                    for c, n in enumerate(names)]
    return plot_artefacts(views, path)


def audit_section(folder, config, models, df, figdir, artefacts=None, n_boot=1000, seed=0, tta=1, bs=64,
                  num_workers=None, device=None, precision=None, log: Callable = print,
                  saved=None) -> tuple[str, pd.DataFrame]:
    """The audit as an HTML section (table, forest plot, the drawn artefacts), and its table. `saved`: the path of
    an audit table of these models already written (`melafast audit`, an earlier report): shown, not run again."""
    from .pages import image, para, table as html_table
    from .plots import plot_audit

    if saved is not None:
        table = pd.read_csv(saved)
        names = _check(table["artefact"].tolist())
        log(f"shortcut audit: reusing {saved} (`--rerun-audit` runs it again)")
    else:
        names = _check(artefacts)
        table, scores = shortcut_audit(models, df, names, n_boot=n_boot, seed=seed, tta=tta, bs=bs,
                                       num_workers=num_workers, device=device, precision=precision)
    size = max(int(m.spec.size) for m in models.values())
    flagged = table.loc[table["flagged"], "artefact"].tolist()
    verdict = (f"Flagged: {', '.join(flagged)}. The run's scores depend on these artefacts; check its training "
               "images for them (and crop, inpaint or balance them) before trusting its figures."
               if flagged else "No artefact flagged: none of them changes how the model ranks lesions beyond the "
               "limit below.")
    shifting = table.loc[table["shifts decisions"] & ~table["flagged"], "artefact"].tolist()
    if shifting:
        verdict += (f" {', '.join(shifting)} {'moves' if len(shifting) == 1 else 'move'} the benign lesions' scores "
                    "without changing the ranking much: decisions at a fixed threshold change when it is present.")
    reused = [] if saved is None else [para(f"The audit of these models saved in {saved} (written "
                                            f"{_when(saved)}), shown as it was run; `melafast report --rerun-audit` "
                                            "or `melafast audit` runs it again.")]
    parts = [*reused,
             para(f"Each artefact drawn synthetically onto every one of the {len(df)} out-of-fold images, each image "
                f"rescored by the fold model that scored it ({'plain view' if tta == 1 else f'TTA x{tta}'}). "
                f"'benign change' is the mean change of the melanoma probability on benign lesions (a rise: false "
                f"alarms the artefact causes), 'melanoma change' the same on melanomas, and the AUC is that of all "
                f"out-of-fold images with the artefact on every one; 95% intervals from {n_boot} bootstrap resamples "
                f"of whole patients (paired for the AUC change). Flagged (a shortcut: the artefact changes how lesions "
                f"are ranked): an AUC fall of at least {MIN_AUC_DROP} with its interval below zero. 'shifts decisions': "
                f"a benign change of at least {MIN_SHIFT} with its interval clear of zero. An artefact that covers the "
                "lesion (hair) can lower the AUC by hiding it; on dark-lesion data a model that leans on overall "
                "darkness reacts to every dark artefact."),
             f'<p class="{"note" if flagged else ""}"><b>{html.escape(verdict)}</b></p>',
             image(plot_audit(table, figdir / "audit.png", MIN_SHIFT)), html_table(table, 3),
             "<h3>What was drawn</h3>",
             para("Placement varies per image (generator seeded by the audit seed, the artefact and the image); the "
                "parameters: " + "; ".join(f"{n}: {_describe(n)}" for n in names) + f". Seed {seed}."),
             image(_examples(df, names, seed, size, figdir / "audit_artefacts.png"))]
    return "\n".join(parts), table


def _when(path) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(Path(path).stat().st_mtime).isoformat(sep=" ", timespec="minutes")


def _describe(name) -> str:
    p = ARTEFACTS[name]
    return p["what"] + " (" + ", ".join(f"{k} {v}" for k, v in p.items() if k != "what") + ")"


def audit_run(run, artefacts=None, data=None, images=None, out=None, n_boot: int = 1000, seed: int = 0,
              tta: int = 1, bs: int = 64, num_workers: int | None = None, device=None, precision: str | None = None,
              log: Callable = print) -> pd.DataFrame:
    """`melafast audit`: the shortcut audit of a finished run on its out-of-fold images. Writes `out` (default
    <run>/audit.html, its figures in <out stem>_figures/) and the table beside it (<out stem>.csv: the run's
    audit.csv by default, which `melafast card` reads); returns the table."""
    from ..atomic import write_csv, write_text
    from .pages import page
    from .runview import fold_models, oof_with_metadata, read_run
    from ..runfolder import RunFolder

    names = _check(artefacts)  # a bad name stops before any work
    if tta not in (1, 2, 4, 8):
        raise MelafastError(f"--tta must be 1, 2, 4 or 8, got {tta}")
    folder = RunFolder(run)
    config, oof = read_run(folder, "the audit")
    df, data = oof_with_metadata(folder, config, oof, data, images)
    out = Path(out) if out is not None else folder.path / "audit.html"
    figdir = out.parent / f"{out.stem}_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    log(f"shortcut audit of {run}: {', '.join(names)} drawn on {len(df)} out-of-fold images from {data}")
    section, table = audit_section(folder, config, fold_models(folder), df, figdir, names, n_boot, seed, tta, bs,
                                   num_workers, device, precision, log)
    write_text(page(f"melafast shortcut audit: {Path(run).name}", {"audit": section}, {"audit": "Shortcut audit"}),
               out)
    write_csv(table, out.with_suffix(".csv"))
    for r in table.to_dict("records"):
        log(f"{r['artefact']:9s} benign lesions' score {r['benign change']:+.3f} [{r['benign lo']:+.3f}, "
            f"{r['benign hi']:+.3f}]  AUC {r['AUC clean']:.3f} -> {r['AUC with artefact']:.3f} ({r['AUC change']:+.3f} "
            f"[{r['AUC lo']:+.3f}, {r['AUC hi']:+.3f}])" + ("  FLAGGED" if r["flagged"] else "")
            + ("  shifts decisions" if r["shifts decisions"] else ""))
    log(f"wrote {out} and {out.with_suffix('.csv')}")
    return table
