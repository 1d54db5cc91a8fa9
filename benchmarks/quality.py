"""Out-of-fold ROC AUC of five recipes on real dermoscopy (HAM10000, melanoma vs rest), same folds, same epochs.

1. frozen backbone + logistic regression on its pooled features (the classic first baseline)
2. plain fastai as its docs teach: vision_learner, lr_find valley, fine_tune, learn.tta()
3. melafast, image only, no TTA
4. melafast + metadata + dihedral TTA x8
5. melafast candidate best: metadata + dihedral TTA x8 + the settings of --best (default: metadata extras,
   melanoma upsampling x2, weight EMA); `--recipes melafast_best --best '{"ema": 0.999}'` tries one switch alone

Folds are lesion-grouped (HAM's patient_id holds the lesion id) and stratified. Prints one JSON object.
Plain fastai's fine_tune gives the unfrozen backbone 1/100 of the head's lr; the melafast recipes use melafast's
default (the same lr for both) unless --lr-mult says otherwise.

    python benchmarks/quality.py                      # full: 5 folds, 224 px, 12 epochs (a GPU job)
    python benchmarks/quality.py --small              # CPU check of the script: 200 images, 48 px, 2 folds, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

SHARED = Path(__file__).resolve().parents[2] / "shared"
BEST = {"extra_meta": True, "upsample": 2, "ema": 0.999}  # the candidate-best recipe's switches
RECIPES = ("frozen_logreg", "plain_fastai", "melafast_image", "melafast_meta_tta", "melafast_best")


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


def frozen_logreg(df, a, device):
    "Pooled features of the pretrained backbone, then one logistic regression per fold."
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from melafast.data import inference_dl
    from melafast.model import create_backbone

    net = create_backbone(a.arch, weights=a.weights).to(device).eval()
    mean = torch.tensor(net.pretrained_cfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"], device=device).view(1, -1, 1, 1)
    feats = []
    with torch.inference_mode():
        for (img,) in inference_dl(df, a.size, None, bs=a.bs, num_workers=a.workers, device=device):
            feats.append(net((img.as_subclass(torch.Tensor) - mean) / std).float().cpu())
    x = torch.cat(feats).numpy()
    pred = np.zeros(len(df))
    for k in sorted(df["fold"].unique()):
        tr, va = (df["fold"] != k).to_numpy(), (df["fold"] == k).to_numpy()
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x[tr]), df["target"].to_numpy()[tr])
        pred[va] = clf.predict_proba(scaler.transform(x[va]))[:, 1]
    return pred


def plain_fastai(df, a, device):
    "fastai's own vision pipeline: vision_learner with the timm backbone, lr_find, fine_tune, random-aug TTA."
    import numpy as np
    from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, ImageBlock, IndexSplitter, Resize,
                                   RocAucBinary, aug_transforms, set_seed, vision_learner)

    pred = np.zeros(len(df))
    for k in sorted(df["fold"].unique()):
        set_seed(a.seed, reproducible=True)
        va = np.flatnonzero(df["fold"] == k)
        dls = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=[0, 1])), get_x=ColReader("fname"),
                        get_y=ColReader("target"), splitter=IndexSplitter(va), item_tfms=Resize(a.size),
                        batch_tfms=aug_transforms()).dataloaders(df, bs=a.bs, num_workers=a.workers, device=device)
        learn = vision_learner(dls, a.arch, metrics=RocAucBinary(), pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(a.weights)))
        if device.type == "cuda":
            learn.to_fp16()
        with learn.no_bar(), learn.no_logging():
            lr = learn.lr_find(show_plot=False, num_it=a.lr_find_its).valley
            learn.fine_tune(a.epochs, lr)
            probs, _ = learn.tta()
        pred[va] = probs[:, 1].numpy()
    return pred


def melafast_recipe(df, a, tmp, name, **settings):
    "One melafast training run (lr_find valley per fold) over the same folds; returns the OOF predictions."
    import pandas as pd

    from melafast.run import TrainConfig, train_run

    data = Path(tmp) / f"data_{name}"
    data.mkdir()
    df.drop(columns=["fname", "fold"]).to_csv(data / "train.csv", index=False)
    cfg = TrainConfig(data=str(data), images=str(Path(a.data) / "images"), arch=a.arch, size=a.size,
                      epochs=a.epochs, bs=a.bs, lr=a.lr, folds=a.folds, pretrained=True, weights=str(a.weights),
                      lr_mult=a.lr_mult, seed=a.seed, workers=a.workers, out=str(Path(tmp) / f"run_{name}"),
                      **settings)
    train_run(cfg, log=lambda m: None)
    oof = pd.read_csv(Path(cfg.out) / "oof.csv").set_index("image_name")
    return oof.loc[df["image_name"], "pred"].to_numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "ham10000"))
    p.add_argument("--arch", default="tf_efficientnet_lite2")
    p.add_argument("--weights", default=None, help="backbone checkpoint (default ../shared/weights/<arch>.safetensors)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="fixed base lr for every recipe (default: lr_find valley)")
    p.add_argument("--lr-mult", type=float, default=None,
                   help="head lr / backbone lr of the melafast recipes (default: melafast's, 1)")
    p.add_argument("--best", type=json.loads, default=BEST,
                   help="TrainConfig settings (JSON) added to metadata + TTA x8 in the candidate-best recipe")
    p.add_argument("--images", type=int, default=None, help="use a lesion-grouped subset of about this many images")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--small", action="store_true", help="tiny CPU settings: checks the script, not the quality")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.arch, a.images, a.size, a.epochs, a.folds, a.bs, a.lr = "tf_efficientnet_lite0", 200, 48, 1, 2, 32, 2e-3
        a.workers = min(a.workers, 2)
    a.weights = Path(a.weights or SHARED / "weights" / f"{a.arch}.safetensors")
    if a.lr_mult is None:
        from melafast.run import TrainConfig

        a.lr_mult = TrainConfig.lr_mult
    a.lr_find_its = 100 if a.lr is None else 20
    if not Path(a.data, "train.csv").is_file() or not a.weights.is_file():
        print(json.dumps({"skipped": f"needs {a.data}/train.csv and {a.weights}"}))
        return None

    import torch
    from sklearn.metrics import roc_auc_score

    from melafast.data import load_competition, make_folds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    df, _ = load_competition(a.data)
    if a.images:
        df = _subset(df, a.images)
    df = make_folds(df, n_folds=a.folds, seed=a.seed)
    runs = {
        "frozen_logreg": lambda tmp: frozen_logreg(df, a, device),
        "plain_fastai": lambda tmp: plain_fastai(df, a, device),
        "melafast_image": lambda tmp: melafast_recipe(df, a, tmp, "image", meta=False, tta=1),
        "melafast_meta_tta": lambda tmp: melafast_recipe(df, a, tmp, "meta", meta=True, tta=8),
        "melafast_best": lambda tmp: melafast_recipe(df, a, tmp, "best", **{"meta": True, "tta": 8, **a.best}),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.recipes.split(","):
            t0 = time.perf_counter()
            pred = runs[name](tmp)
            results[name] = dict(oof_auc=round(float(roc_auc_score(df["target"], pred)), 4),
                                 seconds=round(time.perf_counter() - t0, 1))
    res = dict(data=str(a.data), images=len(df), melanomas=int(df["target"].sum()), folds=a.folds, arch=a.arch,
               size=a.size, epochs=a.epochs, bs=a.bs, lr=a.lr or "lr_find valley", seed=a.seed,
               lr_mult=a.lr_mult, best=a.best,
               device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
               recipes=results)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
