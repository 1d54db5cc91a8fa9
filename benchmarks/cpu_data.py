"""CPU-side speed of the data path, no model involved. Prints one JSON object.

1. `melafast prepare`: full-size JPEGs (default 1536x1024, like a downscaled Kaggle original) resized to 384 px,
   images per second with 1 process (= per core) and with every core.
2. The training data pipeline alone: JPEG decode + item transforms + collate in --workers processes, then the
   batch augmentations, at --size px, batch 64, on the CPU: images per second; and the same without the batch
   augmentations (which run on the GPU when there is one).

    python benchmarks/cpu_data.py              # the figures in the README
    python benchmarks/cpu_data.py --small      # seconds: checks the script only
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


def _full_size_dataset(dest: Path, n: int, width: int, height: int) -> Path:
    "A Kaggle-layout dataset of `n` photo-like JPEGs (smooth shading + a dark blob + sensor noise)."
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    (dest / "jpeg" / "train").mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        base = np.array([220, 170, 140], np.float32) * rng.uniform(0.85, 1.05)
        blob = np.exp(-(((xx - width / 2) / (width / 6)) ** 2 + ((yy - height / 2) / (height / 5)) ** 2))[..., None]
        img = base * (1 - 0.6 * blob) + rng.normal(0, 6, (height, width, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH).save(
            dest / "jpeg" / "train" / f"IMG_{i:05d}.jpg", quality=92)
    pd.DataFrame({"image_name": [f"IMG_{i:05d}" for i in range(n)], "patient_id": [f"P{i // 3}" for i in range(n)],
                  "sex": "female", "age_approx": 50.0, "anatom_site_general_challenge": "torso",
                  "target": [i % 5 == 0 for i in range(n)]}).astype({"target": int}).to_csv(dest / "train.csv", index=False)
    return dest


def prepare_speed(src: Path, out: Path, size: int, workers: int) -> float:
    import melafast.data  # noqa: F401  (import fastai before the clock starts)
    from melafast.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    res = prepare_dataset(src, out, size=size, workers=workers, log=lambda m: None)
    return res["resized"] / (time.perf_counter() - t0)


def pipeline_speed(data: Path, size: int, bs: int, workers: int, augment: bool = True) -> tuple[float, int]:
    "Images/s over one training epoch after its first batch (worker start-up is not the steady state)."
    import numpy as np
    import torch

    from melafast.data import load_competition, melanoma_dls

    df = load_competition(data)[0]
    df["fold"] = (np.arange(len(df)) % 16 == 0).astype(int)  # nearly everything trains
    dls = melanoma_dls(df, fold=1, size=size, bs=bs, num_workers=workers, device=torch.device("cpu"),
                       batch_tfms=None if augment else [])
    it = iter(dls.train)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(img) for img, meta, y in it)
    return n / (time.perf_counter() - t0), n // bs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="full-size images to resize")
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the pipeline figure")
    p.add_argument("--small", action="store_true")
    a = p.parse_args(argv)
    if a.small:
        a.images, a.width, a.height, a.size, a.bs = 24, 320, 240, 64, 8
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = _full_size_dataset(Path(tmp) / "full", a.images, a.width, a.height)
        one = prepare_speed(src, Path(tmp) / "p1", a.size, workers=1)
        every = prepare_speed(src, Path(tmp) / "pn", a.size, workers=cores)
        pipe, batches = pipeline_speed(Path(tmp) / "pn", a.size, a.bs, a.workers)
        no_aug, _ = pipeline_speed(Path(tmp) / "pn", a.size, a.bs, a.workers, augment=False)
    res = dict(cpu_cores=cores, source_px=f"{a.width}x{a.height}", size=a.size,
               prepare_img_s_per_core=round(one, 1), prepare_img_s_all_cores=round(every, 1),
               pipeline_img_s=round(pipe, 1), pipeline_without_batch_augment_img_s=round(no_aug, 1), pipeline_workers=a.workers, pipeline_bs=a.bs, pipeline_batches=batches)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
