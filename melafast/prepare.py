"""Write a resized copy of a dataset: the small JPEGs that keep a GPU fed."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from .errors import DataError, MelafastError

__all__ = ["resize_image", "prepare_dataset"]


def resize_image(src: str, dst: str, size: int, quality: int = 95) -> bool:
    """Resize so the shorter side is `size` (aspect kept, never enlarged), save as JPEG; False if it was up to date."""
    from PIL import Image

    if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        return False
    with Image.open(src) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale straight away
        im = im.convert("RGB")
        scale = size / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        tmp = f"{dst}.tmp"
        im.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, dst)  # a killed run never leaves a half-written image behind
    return True


def _resize_many(jobs, size):
    return sum(resize_image(s, d, size) for s, d in jobs)


def prepare_dataset(src, out, size: int = 384, workers: int | None = None, images=None, log: Callable = print) -> dict:
    """Copy `src`'s CSVs to `out` and write its train/test images, resized, to `out/train` and `out/test`.

    Images are resized so their shorter side is `size` (aspect kept; smaller images are copied as they are);
    melafast then squashes them to `size` x `size` when training. Images already done are skipped.
    """
    from fastprogress.fastprogress import progress_bar

    from .data import load_competition

    if not 16 <= size <= 4096:
        raise MelafastError(f"--size must be between 16 and 4096, got {size}")
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise MelafastError("--out must differ from --src: prepare never overwrites the originals")
    train, test = load_competition(src, images=images)
    out.mkdir(parents=True, exist_ok=True)
    for csv in src.glob("*.csv"):
        shutil.copy2(csv, out / csv.name)
    jobs = []
    for split, df in (("train", train), ("test", test)):
        if df is None:
            continue
        (out / split).mkdir(exist_ok=True)
        jobs += [(f, str(out / split / f"{n}.jpg")) for f, n in zip(df["fname"], df["image_name"])]
    if not jobs:
        raise DataError(f"{src} lists no images")
    workers = workers or os.cpu_count() or 1
    chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for n in progress_bar(pool.map(_resize_many, chunks, [size] * len(chunks)), total=len(chunks)):
                done += n
    else:
        for chunk in progress_bar(chunks):
            done += _resize_many(chunk, size)
    log(f"{out}: {done} images resized to {size} px (shorter side), {len(jobs) - done} already done")
    return dict(resized=done, skipped=len(jobs) - done, total=len(jobs))
