"""Honest ROC AUC of five recipes on real dermoscopy (HAM10000, melanoma vs rest): cross-validated and held out.

A lesion-grouped, stratified part of HAM10000 (--holdout, 20% of the lesions, fixed by --holdout-seed) is set aside
before anything else: no recipe trains, selects or tunes anything on it. Each recipe then trains the same
lesion-grouped folds of the rest (or of --images of it) and is scored twice:

  oof      ROC AUC of its out-of-fold predictions on the cross-validation part (what `melafast train` prints)
  holdout  ROC AUC on the held-out part of its fold models as an ensemble (mean probability, as `submit` does)
  holdout_single  the mean ROC AUC of its fold models one by one on the held-out part (what the OOF figure,
           made of single fold models, estimates; holdout - holdout_single is what the ensemble adds)
  gap      oof - holdout: how far the CV figure is from what the submitted ensemble does on unseen lesions
  oof_pauc, holdout_pauc  the partial AUC above 80% true-positive rate (ISIC 2024's metric, 0 to 0.2) of the OOF
           predictions and of the held-out ensemble
  op_*     melafast recipes: the operating point "sensitivity >= 90%" chosen on the OOF rows and saved as
           `melafast report --operating-point sens90` saves it; op_crossfit_sens is its cross-fitted sensitivity,
           op_holdout_sens/spec what `predict`'s decision (the fold models' vote) reaches on the held-out part, and
           op_holdout_sens_mean/spec_mean the fold mean against the same threshold, for comparison; with
           --op-fresh N the same on about N fresh lesions (op_fresh_*); with --op-calibrate N the point chosen
           instead on a calibration set of N other fresh lesions, on the fold mean, as `melafast calibrate` does
           (op_cal_crossfit_sens: cross-fitted on the calibration set; op_cal_holdout_sens/spec: predict's
           decision on the held-out part)

--seeds N repeats everything with N seeds (folds, initialisation, augmentation: --seed, --seed + 1, ...; with
--resample also the CV subset of --images, so the sd covers which lesions the CV holds) and reports mean and
sample standard deviation over seeds; when the image-only and the metadata recipe ran on the same seeds, the
blanked metadata model minus the image-only model, paired by seed (blank_vs_image). Every recipe follows the same rules: 1 frozen epoch + --epochs,
the model after the last epoch (nothing chosen on any scored row), and the same lr rule: --lr X gives every recipe
that fixed lr; without --lr every recipe uses its own lr_find valley, --lr-find-its iterations, found per fold.

Recipes (rows):
  frozen_logreg      pretrained backbone's pooled features + logistic regression (C=0.1, no tuning); no TTA
  plain_fastai       fastai as its docs teach: vision_learner, aug_transforms, fine_tune (lr_mult 100); no TTA
  plain_fastai_tta   the same models with fastai's learn.tta() (4 random-augmentation passes blended with 1 plain)
  melafast_image     melanoma_learner on the image only, no TTA
  melafast_image_tta the same with dihedral TTA x8 (not run by default): the image-only model "trained the same
                     way" as melafast_meta_tta, to compare with that one's predictions without metadata
  melafast_meta_tta  melafast's defaults: image + metadata, dihedral TTA x8
  melafast_best      metadata + TTA x8 + the switches in --best (default: metadata extras, upsampling x2, EMA)

Recipes with metadata are also scored with every metadata field blanked at prediction (as a patient who comes with
images only): oof_blank (each fold model on its own validation rows) and holdout_blank (the fold ensemble).

--settings JSON adds TrainConfig settings to every melafast recipe (e.g. '{"lr_find_on": "unfrozen"}',
'{"frozen_bn": false}', '{"keep": "best"}'; with keep=best a recipe also reports oof_selected, the optimistic CV
of the epochs it kept). Prints one JSON object on stdout and a markdown table on stderr;
`--table A.json B.json ...` prints one markdown table of several saved results.

    python benchmarks/quality.py                      # full: 5 folds, 224 px, 12 epochs, 1 seed (a GPU job)
    python benchmarks/quality.py --arch tf_efficientnet_lite0 --images 3000 --size 128 --epochs 3 --folds 3 \\
        --bs 32 --seeds 3 --workers 2                 # the CPU-scale table in the README
    python benchmarks/quality.py --small              # CPU check of the script: 160 images, 32 px, 2 seeds, TTA <= x2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

SHARED = Path(__file__).resolve().parents[2] / "shared"
OPERATING_POINT = "sens90"  # the saved operating point whose held-out sensitivity the melafast recipes report
SMALL_HOLDOUT_IMAGES = 120  # --small scores on about this many held-out images: enough to check the script
BEST = {"extra_meta": True, "upsample": 2, "ema": 0.999}  # the candidate-best recipe's switches
RECIPES = ("frozen_logreg", "plain_fastai", "melafast_image", "melafast_meta_tta", "melafast_best")
ROWS = {"frozen_logreg": ("frozen_logreg",), "plain_fastai": ("plain_fastai", "plain_fastai_tta"),
        "melafast_image": ("melafast_image",), "melafast_meta_tta": ("melafast_meta_tta",),
        "melafast_best": ("melafast_best",), "melafast_image_tta": ("melafast_image_tta",)}  # rows of each recipe


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _subset(df, n, seed=0):
    "About `n` images, whole lesions only, melanoma images kept at their share."
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = df.groupby("patient_id").size()
    lesions = df.groupby("patient_id")["target"].max()

    def take(ids, n_images):  # lesions in random order until they hold n_images images
        ids = rng.permutation(ids)
        return list(ids[: int(np.searchsorted(sizes[ids].cumsum().to_numpy(), n_images)) + 1])

    mel = take(lesions[lesions == 1].index, max(2, int(n * df["target"].mean())))
    rest = take(lesions[lesions == 0].index, n - sizes[mel].sum())
    return df[df["patient_id"].isin(mel + rest)].reset_index(drop=True)


def _cv_part(rest, hold, a, subset_seed: int, n_fresh):
    """The CV part of the non-held-out images (about --images of them, drawn with `subset_seed`), and, on `a`, what
    depends on it: the fresh images of --fresh-check, --op-fresh and --op-calibrate (lesions the subset left unused)
    and the images whose features frozen_logreg pools."""
    import pandas as pd

    cv = _subset(rest, a.images, seed=subset_seed) if a.images else rest
    unused = rest[~rest["image_name"].isin(cv["image_name"])].reset_index(drop=True)
    a.fresh = unused if a.fresh_check else None
    if a.fresh is not None and a.fresh["target"].nunique() < 2:
        raise SystemExit("--fresh-check needs --images smaller than the non-held-out part (fresh images of both classes)")
    if a.fresh is not None and a.small:
        a.fresh = _subset(a.fresh, 100, seed=1)
    if n_fresh is not None:  # about N fresh lesions: non-held-out images the CV subset left unused
        a.op_fresh = _subset(unused, n_fresh, seed=a.holdout_seed + 1) if n_fresh < len(unused) else unused
    if getattr(a, "op_calibrate", None) is not None:  # a calibration set: other fresh lesions (none of --op-fresh's)
        pool = unused if a.op_fresh is None else unused[~unused["patient_id"].isin(a.op_fresh["patient_id"])]
        a.op_cal = (_subset(pool, a.op_calibrate, seed=a.holdout_seed + 2) if a.op_calibrate < len(pool)
                    else pool.reset_index(drop=True))
    else:
        a.op_cal = None
    a.everything = pd.concat([cv, hold], ignore_index=True)
    a.__dict__.pop("_features", None)  # frozen_logreg's pooled features belong to one CV part
    return cv


def _shrunk(a, tmp, frames: dict) -> dict:
    """--small only: every image the run will read, resized once (shorter side 2 x --size) into `tmp`, and the tables
    pointed at the copies. Decoding the full-size JPEGs again for every recipe and seed was most of --small's time."""
    from PIL import Image

    out = Path(tmp) / "small_images"
    out.mkdir()
    names = pd_concat([f[["image_name", "fname"]] for f in frames.values() if f is not None]).drop_duplicates("image_name")
    side = 2 * a.size
    for name, fname in zip(names["image_name"], names["fname"]):
        with Image.open(fname) as im:
            im.draft("RGB", (side, side))
            im = im.convert("RGB")
            scale = side / min(im.size)
            im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale)))).save(out / f"{name}.jpg",
                                                                                                      quality=95)
    a.image_dir = out
    return {k: None if f is None else f.assign(fname=[str(out / f"{n}.jpg") for n in f["image_name"]])
            for k, f in frames.items()}


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def split_holdout(df, frac: float = 0.2, seed: int = 0):
    "(rest, held-out): about `frac` of the lesions, stratified by target, whole lesions on one side only."
    from melafast.data import make_folds

    part = make_folds(df, n_folds=max(2, round(1 / frac)), seed=seed)["fold"] == 0
    return df[~part].reset_index(drop=True), df[part].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Recipes: each returns {row name: (out-of-fold predictions in df's order, held-out predictions)}


def frozen_logreg(df, hold, a, seed, tmp, device):
    "Pooled features of the pretrained backbone (extracted once), then one logistic regression per fold."
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = _features(a, device)
    x, xh = feats.loc[df["image_name"]].to_numpy(), feats.loc[hold["image_name"]].to_numpy()
    oof, held = np.zeros(len(df)), []
    for k in sorted(df["fold"].unique()):
        tr, va = (df["fold"] != k).to_numpy(), (df["fold"] == k).to_numpy()
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x[tr]), df["target"].to_numpy()[tr])
        oof[va] = clf.predict_proba(scaler.transform(x[va]))[:, 1]
        held.append(clf.predict_proba(scaler.transform(xh))[:, 1])
    return {"frozen_logreg": dict(oof=oof, held=held)}


def _features(a, device):
    "Pooled backbone features of every image of the CV and held-out parts, as a DataFrame indexed by image name."
    import pandas as pd
    import torch

    from melafast.data import inference_dl
    from melafast.model import create_backbone

    if getattr(a, "_features", None) is not None:
        return a._features
    net = create_backbone(a.arch, weights=a.weights).to(device).eval()
    mean = torch.tensor(net.pretrained_cfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"], device=device).view(1, -1, 1, 1)
    feats = []
    with torch.inference_mode():
        for (img,) in inference_dl(a.everything, a.size, None, bs=a.bs, num_workers=a.workers, device=device):
            feats.append(net((img.as_subclass(torch.Tensor) - mean) / std).float().cpu())
    a._features = pd.DataFrame(torch.cat(feats).numpy(), index=a.everything["image_name"])
    return a._features


def plain_fastai(df, hold, a, seed, tmp, device):
    "fastai's own vision pipeline: vision_learner with the timm backbone, fine_tune, plain and learn.tta() predictions."
    import numpy as np
    from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, ImageBlock, IndexSplitter, Resize,
                                   RocAucBinary, aug_transforms, set_seed, vision_learner)

    oof, oof_tta, held, held_tta = np.zeros(len(df)), np.zeros(len(df)), [], []
    for k in sorted(df["fold"].unique()):
        set_seed(seed, reproducible=True)
        va = np.flatnonzero(df["fold"] == k)
        dls = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=[0, 1])), get_x=ColReader("fname"),
                        get_y=ColReader("target"), splitter=IndexSplitter(va), item_tfms=Resize(a.size),
                        batch_tfms=aug_transforms()).dataloaders(df, bs=a.bs, num_workers=a.workers, device=device)
        learn = vision_learner(dls, a.arch, metrics=RocAucBinary(), pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(a.weights)))
        if device.type == "cuda":
            learn.to_fp16()
        with learn.no_bar(), learn.no_logging():
            lr = a.lr or _valley(learn, a)
            learn.fine_tune(a.epochs, lr)
            oof[va] = learn.get_preds()[0][:, 1].numpy()
            oof_tta[va] = learn.tta()[0][:, 1].numpy()
            test = dls.test_dl(hold)
            held.append(learn.get_preds(dl=test)[0][:, 1].numpy())
            held_tta.append(learn.tta(dl=test)[0][:, 1].numpy())
    return {"plain_fastai": dict(oof=oof, held=held), "plain_fastai_tta": dict(oof=oof_tta, held=held_tta)}


def _valley(learn, a) -> float:
    "lr_find's valley with the same iterations and on the same phase (frozen or not) as the melafast recipes."
    learn.freeze() if a.lr_find_on == "frozen" else learn.unfreeze()
    return float(learn.lr_find(show_plot=False, num_it=a.lr_find_its).valley)


def melafast_recipe(df, hold, a, seed, tmp, device, name, **settings):
    "One `train_run` over the same folds; held-out predictions from its fold models as `submit` makes them."
    import pandas as pd

    from melafast.inference.predictor import load_predictor
    from melafast.inference.loop import predict_many
    from melafast.config import TrainConfig
    from melafast.train.run import train_run

    data = Path(tmp) / f"data_{name}_{seed}"
    data.mkdir()
    df.drop(columns=["fname", "fold"]).to_csv(data / "train.csv", index=False)
    if a.small and settings.get("tta", 1) > 2:  # a check of the script: two views exercise the TTA path as eight do
        settings["tta"] = 2
    cfg = TrainConfig(data=str(data), images=str(a.image_dir), arch=a.arch, size=a.size,
                      epochs=a.epochs, bs=a.bs, lr=a.lr, folds=a.folds, pretrained=True, weights=str(a.weights),
                      lr_mult=a.lr_mult, seed=seed, workers=a.workers, out=str(Path(tmp) / f"run_{name}_{seed}"),
                      **{"lr_find_on": a.lr_find_on, **a.settings, **settings})
    train_run(cfg, log=lambda m: None)
    oof = pd.read_csv(Path(cfg.out) / "oof.csv").set_index("image_name").loc[df["image_name"]]
    # each fold model's held-out predictions, in one pass over the images; their mean is what `submit` writes; for
    # a recipe with metadata the same pass also gives them with every field blanked (a patient without metadata)
    models = load_predictor(cfg.out).predictors
    patterns = missing_patterns(models[0].meta_proc) if cfg.meta else {"none": None}
    held, held_patterns = predict_many(models, hold, tta=cfg.tta, bs=a.bs, num_workers=a.workers, progress=False,
                                       blank=patterns)
    row = dict(oof=oof["pred"].to_numpy(), held=held)
    if cfg.meta:  # train scored its OOF rows without metadata too, as `pred_no_meta`
        row["held_blank"], row["oof_blank"] = held_patterns["none"], oof["pred_no_meta"].to_numpy()
        row["patterns"] = {name: preds for name, preds in held_patterns.items() if name != "none"}
    if "pred_selected" in oof.columns:  # keep=best: also the CV of the kept epochs, chosen on these rows
        row["selected"] = oof["pred_selected"].to_numpy()
    row["op"] = _operating_point_check(cfg.out, held, hold)
    if a.op_fresh is not None:  # the same operating point on fresh lesions, drawn like the CV's own
        from melafast.runfolder import RunFolder

        fresh = predict_many(models, a.op_fresh, tta=cfg.tta, bs=a.bs, num_workers=a.workers, progress=False)
        saved = RunFolder(cfg.out).operating_point()
        row["op"].update({k.replace("holdout", "fresh"): v for k, v in
                          _operating_point_check(cfg.out, fresh, a.op_fresh, saved).items() if k != "op_crossfit_sens"})
    if a.op_cal is not None:  # the operating point chosen on a calibration set of fresh lesions, on predict's scale
        from melafast.inference import load_predictor
        from melafast.evaluate.calibrate import calibrate_operating_point
        from melafast.evaluate.operating import _rates

        cal = predict_many(models, a.op_cal, tta=cfg.tta, bs=a.bs, num_workers=a.workers, progress=False)
        point = calibrate_operating_point(cfg.out, OPERATING_POINT, table=a.op_cal, per_model=cal, n_boot=200,
                                          log=lambda m: None)
        decision, _ = load_predictor(cfg.out).decide(held)
        sens, spec = _rates(hold["target"].to_numpy(), decision)
        row["op"].update(op_cal_crossfit_sens=point.crossfit["sensitivity"]["value"], op_cal_holdout_sens=sens,
                         op_cal_holdout_spec=spec)
    if a.fresh is not None:
        row["diag"] = _single_model_check(models, df, hold, a)
    return {name: row}


def missing_patterns(proc) -> dict:
    """The missing-field patterns a user can bring, as the columns blanked at prediction: each given field missing
    (`without_<field>`), only one field given (`only_<field>`), and none (`none`, the image-only path); `all` fields
    is the plain prediction."""
    given = proc.given_columns
    out = {f"without_{c}": [c] for c in given}
    if len(given) > 2:  # with two fields "only one" is "the other missing"
        out.update({f"only_{c}": [g for g in given if g != c] for c in given})
    out["none"] = None
    return out


def _operating_point_check(run, held, hold, point=None) -> dict:
    """The operating point "sensitivity >= 90%" saved as `melafast report --operating-point sens90` saves it (chosen on
    the run's OOF rows), then applied to the held-out part as `predict` applies it (each fold model's probabilities,
    `held`, voted), and, for comparison, the fold mean against the same threshold (not what predict does). `point`:
    the operating point already saved (not chosen again)."""
    import numpy as np

    from melafast.inference import load_predictor
    from melafast.evaluate.operating import _rates, save_operating_point

    point = point or save_operating_point(run, OPERATING_POINT, n_boot=200)
    decision, _ = load_predictor(run).decide(held)
    target = hold["target"].to_numpy()
    sens, spec = _rates(target, decision)
    mean_sens, mean_spec = _rates(target, (np.mean(held, axis=0) >= point.threshold).astype(int))
    return dict(op_crossfit_sens=point.crossfit["sensitivity"]["value"], op_holdout_sens=sens,
                op_holdout_spec=spec, op_holdout_sens_mean=mean_sens, op_holdout_spec_mean=mean_spec)


def _single_model_check(models, df, hold, a) -> dict:
    """Each fold model alone, plain view (no TTA), on three sets: its own validation fold, the held-out part, and the
    fresh images (the non-held-out images the CV subset left unused). Tells a held-out part that is easier or harder
    than the data at large from a CV that is off."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from melafast.inference.loop import predict_many

    out = {"valid": [], "holdout": [], "fresh": []}
    for model in models:
        own = df[df["fold"] == model.config["fold"]]
        for key, rows in (("valid", own), ("holdout", hold), ("fresh", a.fresh)):
            pred = predict_many([model], rows, tta=1, bs=a.bs, num_workers=a.workers, progress=False)[0]
            out[key].append(roc_auc_score(rows["target"], pred))
    return {f"single_tta1_{k}": round(float(np.mean(v)), 4) for k, v in out.items()}


def melafast_image(*args):
    return melafast_recipe(*args, "melafast_image", meta=False, tta=1)


def melafast_meta_tta(*args):
    return melafast_recipe(*args, "melafast_meta_tta", meta=True, tta=8)


def melafast_best(df, hold, a, *args):
    return melafast_recipe(df, hold, a, *args, "melafast_best", **{"meta": True, "tta": 8, **a.best})


def melafast_image_tta(*args):
    return melafast_recipe(*args, "melafast_image_tta", meta=False, tta=8)


RUNNERS = dict(frozen_logreg=frozen_logreg, plain_fastai=plain_fastai, melafast_image=melafast_image,
               melafast_meta_tta=melafast_meta_tta, melafast_best=melafast_best, melafast_image_tta=melafast_image_tta)


# --------------------------------------------------------------------------------------------------
# Scores and tables


def _mean_sd(values) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return dict(mean=round(float(v.mean()), 4), sd=round(float(v.std(ddof=1)), 4) if len(v) > 1 else None)


def summarize(per_seed: list) -> dict:
    "Mean and sample sd over seeds of the OOF, held-out and gap figures (and of the selected CV when present)."
    keys = ["oof", "holdout", "holdout_single", "gap", *(k for k in per_seed[0] if k.startswith("single_tta1_")),
            *(k for k in ("oof_pauc", "holdout_pauc", "oof_blank", "holdout_blank") if k in per_seed[0]),
            *(k for k in per_seed[0] if k.startswith(("holdout_without_", "holdout_only_"))),
            *(k for k in per_seed[0] if k.startswith("op_"))]
    out = {key: _mean_sd([r[key] for r in per_seed]) for key in keys}
    out["abs_gap_mean"] = round(float(sum(abs(r["gap"]) for r in per_seed) / len(per_seed)), 4)
    if all("oof_selected" in r for r in per_seed):
        out["oof_selected"] = _mean_sd([r["oof_selected"] for r in per_seed])
    return out


def _cell(s: dict) -> str:
    return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s.get("sd") is not None else "")


def blank_vs_image(per_seed: dict) -> dict | None:
    """When a recipe with metadata and the image-only one ran on the same seeds (same CV part, same folds): per seed,
    the metadata model with every field blanked minus the image-only model, OOF and held out, with mean and sd."""
    import numpy as np

    image = {r["seed"]: r for r in per_seed.get("melafast_image_tta", [])}
    meta = [r for r in per_seed.get("melafast_meta_tta", []) if "holdout_blank" in r and r["seed"] in image]
    if not meta:
        return None
    out = {}
    for key, blank in (("oof", "oof_blank"), ("holdout", "holdout_blank")):
        diffs = [round(r[blank] - image[r["seed"]][key], 4) for r in meta]
        out[key] = dict(per_seed=diffs, mean=round(float(np.mean(diffs)), 4),
                        sd=round(float(np.std(diffs, ddof=1)), 4) if len(diffs) > 1 else None)
    return out


def markdown_table(results: list) -> str:
    "One markdown row per (result file, recipe row): OOF, held-out and gap as mean ± sd over seeds."
    lines = ["| run | recipe | seeds | OOF AUC | held-out AUC, fold ensemble | held-out AUC, one fold model "
             "| OOF - held-out | OOF pAUC | held-out pAUC |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, r in res["recipes"].items():
            s = r["summary"]
            oof = _cell(s["oof"]) + (f" (kept epochs: {_cell(s['oof_selected'])})" if "oof_selected" in s else "")
            lines.append(f"| {res.get('label') or ''} | {name} | {len(r['per_seed'])} | {oof} | {_cell(s['holdout'])} "
                         f"| {_cell(s['holdout_single'])} | {s['gap']['mean']:+.3f} | "
                         + " | ".join(_cell(s[k]) if k in s else "not measured" for k in ("oof_pauc", "holdout_pauc"))
                         + " |")
    checks = [(res, name, r["summary"]) for res in results for name, r in res["recipes"].items()
              if "single_tta1_fresh" in r["summary"]]
    if checks:  # --fresh-check: each fold model alone, plain view, on three sets
        lines += ["", "| run | recipe | its own validation fold | held-out part | fresh images |", "|---|---|---|---|---|"]
        lines += [f"| {res.get('label') or ''} | {name} | {_cell(s['single_tta1_valid'])} | "
                  f"{_cell(s['single_tta1_holdout'])} | {_cell(s['single_tta1_fresh'])} |" for res, name, s in checks]
    blanks = [(res, name, r["summary"]) for res in results for name, r in res["recipes"].items()
              if "holdout_blank" in r["summary"]]
    if blanks:  # recipes with metadata, predicted with and without it
        lines += ["", "| run | recipe | OOF AUC, metadata | OOF AUC, every field blanked | held-out AUC, metadata "
                  "| held-out AUC, every field blanked |", "|---|---|---|---|---|---|"]
        lines += [f"| {res.get('label') or ''} | {name} | {_cell(s['oof'])} | {_cell(s['oof_blank'])} | "
                  f"{_cell(s['holdout'])} | {_cell(s['holdout_blank'])} |" for res, name, s in blanks]
    for res, name, s in blanks:  # some fields missing at prediction: each against the image-only path
        pats = [k for k in s if k.startswith(("holdout_without_", "holdout_only_"))]
        if not pats:
            continue
        lines += ["", f"| {res.get('label') or ''} {name}: fields at prediction | held-out AUC | minus the no-field "
                  "(image-only) path, paired by seed |", "|---|---|---|"]
        rows = [("all fields", "holdout"), *((k[len("holdout_"):].replace("_", " ", 1), k) for k in pats),
                ("no field (image head)", "holdout_blank")]
        for label, key in rows:
            diffs = [r[key] - r["holdout_blank"] for r in res["recipes"][name]["per_seed"]]
            lines.append(f"| {label} | {_cell(s[key])} | {_cell(_mean_sd(diffs))} |")
    points = [(res, name, r["summary"]) for res in results for name, r in res["recipes"].items()
              if "op_holdout_sens" in r["summary"]]
    if points:  # the saved operating point "sensitivity >= 90%" on the held-out part
        lines += ["", "| run | recipe | cross-fitted sensitivity (OOF) | held-out sensitivity, predict's decision "
                  "| held-out specificity, predict's decision | held-out sensitivity, fold mean >= threshold "
                  "| held-out specificity, fold mean >= threshold |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {res.get('label') or ''} | {name} | " + " | ".join(_cell(s[k]) for k in (
            "op_crossfit_sens", "op_holdout_sens", "op_holdout_spec", "op_holdout_sens_mean", "op_holdout_spec_mean"))
            + " |" for res, name, s in points]
        fresh = [(res, name, s) for res, name, s in points if "op_fresh_sens" in s]
        if fresh:
            lines += ["", "| run | recipe | fresh lesions: sensitivity, predict's decision | specificity, predict's "
                      "decision | sensitivity, fold mean >= threshold | specificity, fold mean >= threshold |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {res.get('label') or ''} | {name} | " + " | ".join(_cell(s[k]) for k in (
                "op_fresh_sens", "op_fresh_spec", "op_fresh_sens_mean", "op_fresh_spec_mean")) + " |"
                for res, name, s in fresh]
    cals = [(res, name, s) for res, name, s in points if "op_cal_holdout_sens" in s]
    if cals:  # the operating point chosen on a calibration set, on predict's own scale
        lines += ["", "| run | recipe | calibration set: cross-fitted sensitivity | held-out sensitivity, predict's "
                  "decision (fold mean) | held-out specificity |", "|---|---|---|---|---|"]
        lines += [f"| {res.get('label') or ''} | {name} | " + " | ".join(_cell(s[k]) for k in (
            "op_cal_crossfit_sens", "op_cal_holdout_sens", "op_cal_holdout_spec")) + " |" for res, name, s in cals]
    paired = [res for res in results if res.get("blank_vs_image")]
    if paired:  # the same seeds, CV parts and folds: every field blanked minus the image-only model
        lines += ["", "| run | OOF AUC: blanked - image only, paired by seed | held-out AUC: blanked - image only |",
                  "|---|---|---|"]
        lines += [f"| {res.get('label') or ''} | " + " | ".join(
            f"{d['mean']:+.3f} ± {d['sd'] or 0:.3f} ({', '.join(f'{x:+.3f}' for x in d['per_seed'])})"
            for d in (res["blank_vs_image"]["oof"], res["blank_vs_image"]["holdout"])) + " |" for res in paired]
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "ham10000"))
    p.add_argument("--arch", default="tf_efficientnet_lite2")
    p.add_argument("--weights", default=None, help="backbone checkpoint (default ../shared/weights/<arch>.safetensors)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=12, help="epochs after the one frozen epoch")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="fixed base lr for every recipe (default: each one's valley)")
    p.add_argument("--lr-find-its", type=int, default=100, help="lr_find iterations for every recipe's valley")
    p.add_argument("--lr-find-on", choices=("frozen", "unfrozen"), default=None,
                   help="model every recipe's lr_find runs on (default: melafast's)")
    p.add_argument("--lr-mult", type=float, default=None,
                   help="head lr / backbone lr of the melafast recipes (default: melafast's, 1)")
    p.add_argument("--best", type=json.loads, default=BEST,
                   help="TrainConfig settings (JSON) added to metadata + TTA x8 in the candidate-best recipe")
    p.add_argument("--settings", type=json.loads, default={},
                   help="TrainConfig settings (JSON) for every melafast recipe")
    p.add_argument("--images", type=int, default=None,
                   help="cross-validate on a lesion-grouped subset of about this many images of the non-held-out part")
    p.add_argument("--holdout", type=float, default=0.2, help="share of the lesions set aside, never trained on")
    p.add_argument("--holdout-seed", type=int, default=0, help="fixes the held-out part (the same for every seed)")
    p.add_argument("--holdout-images", type=int, default=None,
                   help="score on a lesion-grouped subset of about this many images of the held-out part")
    p.add_argument("--fresh-check", action="store_true",
                   help="melafast recipes: also score each fold model alone, plain view, on its validation fold, the "
                        "held-out part and the images --images left unused (single_tta1_valid/holdout/fresh)")
    p.add_argument("--op-fresh", type=int, default=None, metavar="N",
                   help="melafast recipes: also apply the saved operating point to about N fresh images (lesions of the "
                        "non-held-out part that --images left unused): op_fresh_sens/spec")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=42, help="first seed; the others follow it")
    p.add_argument("--seeds", type=int, default=1, help="repeat every recipe with this many seeds")
    p.add_argument("--op-calibrate", type=int, default=None, metavar="N",
                   help="melafast recipes: also choose the operating point on a calibration set of about N fresh "
                        "lesions (as `melafast calibrate` does: on the fold mean) and apply it to the held-out part: "
                        "op_cal_crossfit_sens, op_cal_holdout_sens/spec")
    p.add_argument("--resample", action="store_true",
                   help="with --images: each seed draws its own CV subset of the non-held-out part (seed-to-seed sd "
                        "then covers which lesions the CV holds, not only folds and initialisation)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--label", default="", help="a name for this run in the JSON and the markdown table")
    p.add_argument("--small", action="store_true", help="tiny CPU settings: checks the script, not the quality")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print one markdown table of these saved results; no run")
    a = p.parse_args(argv)
    if a.small:
        # 32 px and no DataLoader processes: a check of the script, as cheap as it gets on a CPU
        a.arch, a.images, a.size, a.epochs, a.folds, a.bs, a.lr = "tf_efficientnet_lite0", 160, 32, 1, 2, 32, 2e-3
        a.holdout_images, a.seeds, a.workers = SMALL_HOLDOUT_IMAGES, max(a.seeds, 2), 0
    a.weights = Path(a.weights or SHARED / "weights" / f"{a.arch}.safetensors")
    from melafast.config import TrainConfig

    a.lr_mult = TrainConfig.lr_mult if a.lr_mult is None else a.lr_mult
    a.lr_find_on = a.settings.get("lr_find_on", a.lr_find_on or TrainConfig.lr_find_on)
    unknown = [r for r in a.recipes.split(",") if r not in RUNNERS]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    return a


def main(argv=None):
    a = _parse(argv)
    if a.table:
        print(markdown_table([json.loads(Path(f).read_text()) for f in a.table]))
        return {}
    if not Path(a.data, "train.csv").is_file() or not a.weights.is_file():
        print(json.dumps({"skipped": f"needs {a.data}/train.csv and {a.weights}"}))
        return None

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from melafast.data import load_competition, make_folds
    from melafast.metrics import pauc

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full, _ = load_competition(a.data)
    rest, hold = split_holdout(full, a.holdout, a.holdout_seed)
    if a.holdout_images:  # fewer held-out images, still whole lesions, melanomas at their share
        hold = _subset(hold, a.holdout_images, seed=a.holdout_seed)
    n_fresh = a.op_fresh
    cv = _cv_part(rest, hold, a, subset_seed=0, n_fresh=n_fresh)
    seeds = [a.seed + i for i in range(a.seeds)]
    per_seed = {row: [] for r in a.recipes.split(",") for row in ROWS[r]}
    cv_sizes = []
    # training's progress lines go to stderr with the log: stdout carries the JSON object only
    a.image_dir = Path(a.data) / "images"
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        if a.small:  # a check of the script: read small copies of the few images it uses
            parts = _shrunk(a, tmp, dict(cv=cv, hold=hold, fresh=a.fresh, everything=a.everything))
            cv, hold, a.fresh, a.everything = parts["cv"], parts["hold"], parts["fresh"], parts["everything"]
        for seed in seeds:
            if a.resample and a.images:  # each seed its own CV subset (and fresh images) of the non-held-out part
                cv = _cv_part(rest, hold, a, subset_seed=seed, n_fresh=n_fresh)
                cv_sizes.append((len(cv), int(cv["target"].sum())))
            df = make_folds(cv, n_folds=a.folds, seed=seed)
            for recipe in a.recipes.split(","):
                t0 = time.perf_counter()
                rows = RUNNERS[recipe](df, hold, a, seed, tmp, device)
                seconds = round(time.perf_counter() - t0, 1)
                for name, got in rows.items():
                    held = got["held"]
                    r = dict(seed=seed, oof=round(float(roc_auc_score(df["target"], got["oof"])), 4),
                             holdout=round(float(roc_auc_score(hold["target"], np.mean(held, axis=0))), 4),
                             holdout_single=round(float(np.mean([roc_auc_score(hold["target"], h) for h in held])), 4),
                             seconds=seconds)
                    r["gap"] = round(r["oof"] - r["holdout"], 4)
                    r["oof_pauc"] = round(pauc(df["target"], got["oof"]), 4)  # partial AUC above 80% TPR (0 to 0.2)
                    r["holdout_pauc"] = round(pauc(hold["target"], np.mean(held, axis=0)), 4)
                    if "selected" in got:
                        r["oof_selected"] = round(float(roc_auc_score(df["target"], got["selected"])), 4)
                    if "held_blank" in got:
                        r["oof_blank"] = round(float(roc_auc_score(df["target"], got["oof_blank"])), 4)
                        r["holdout_blank"] = round(float(roc_auc_score(hold["target"], np.mean(got["held_blank"], axis=0))), 4)
                    for pattern, preds in got.get("patterns", {}).items():  # some fields missing at prediction
                        r[f"holdout_{pattern}"] = round(float(roc_auc_score(hold["target"], np.mean(preds, axis=0))), 4)
                    r.update(got.get("diag", {}))
                    r.update({k: round(float(v), 4) for k, v in got.get("op", {}).items()})
                    per_seed[name].append(r)
                    _log(f"seed {seed} {name}: {r}")
    res = dict(label=a.label, data=str(a.data), cv_images=len(cv), cv_melanomas=int(cv["target"].sum()),
               resample=bool(a.resample and a.images), cv_sizes_per_seed=cv_sizes or None,
               holdout_images=len(hold), holdout_melanomas=int(hold["target"].sum()),
               holdout_lesions=int(hold["patient_id"].nunique()), folds=a.folds, arch=a.arch, size=a.size,
               epochs=a.epochs, freeze_epochs=1, bs=a.bs, lr=a.lr or f"lr_find valley ({a.lr_find_its} iterations)",
               lr_find_on=a.lr_find_on, lr_mult=a.lr_mult, best=a.best, settings=a.settings, seeds=seeds,
               device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
               recipes={name: dict(summary=summarize(rows), per_seed=rows) for name, rows in per_seed.items()})
    paired = blank_vs_image(per_seed)
    if paired:
        res["blank_vs_image"] = paired
    text = json.dumps(res, indent=2)
    print(text)
    _log(markdown_table([res]))
    if a.out:
        Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
