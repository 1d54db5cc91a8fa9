"""Write a resized copy of a dataset: the small JPEGs that keep a GPU fed."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import DataError, MelafastError

__all__ = ["resize_image", "prepare_dataset", "RECORD"]


def _prepare_store(src, out, size, workers, train, test, record, settings, log) -> dict:
    "prepare_dataset's HDF5 path: each split resized into one store, streamed chunk by chunk."
    from ..atomic import write_json
    from .store import write_store
    from ..progress import progress as shown

    workers = workers or os.cpu_count() or 1
    write_json(dict(settings, src=str(src.resolve()), store=True, finished=False), record)
    total = 0
    for split, df in (("train", train), ("test", test)):
        if df is None:
            continue
        jobs = list(zip(df["fname"], df["image_name"]))
        chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]

        def items(chunks=chunks):
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    results = pool.map(_encode_many, chunks, [size] * len(chunks))
                    for part in shown(results, total=len(chunks), label=f"resize into {split}-image.hdf5", size=len):
                        yield from part
            else:
                for chunk in shown(chunks, total=len(chunks), label=f"resize into {split}-image.hdf5", size=len):
                    yield from _encode_many(chunk, size)

        total += write_store(out / f"{split}-image.hdf5", items())
    if not total:
        raise DataError(f"{src} lists no images")
    write_json(dict(settings, src=str(src.resolve()), store=True, finished=True, images=total), record)
    log(f"{out}: {total} images resized to {size} px (shorter side) into HDF5 stores")
    return dict(resized=total, skipped=0, total=total)

RECORD = "prepare.json"  # the settings a prepared folder was made with
QUALITY = 95  # JPEG quality of the copies


def _shorter_side(path: str) -> int:
    from PIL import Image

    from .store import open_image

    with Image.open(open_image(path)) as im:  # reads the header only
        return min(im.size)


def _resized(src: str, size: int):
    "The image `src` (a file or a stored image) as RGB with its shorter side `size` (aspect kept, never enlarged)."
    from PIL import Image

    from .store import open_image

    with Image.open(open_image(src)) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale straight away
        im = im.convert("RGB")
        scale = size / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        return im


def _up_to_date(src: str, dst: str, size: int) -> bool:
    "A copy made from this source (not older than it) at this size: its shorter side is min(size, the source's)."
    try:
        if os.path.getmtime(dst) < os.path.getmtime(src):
            return False
        return _shorter_side(dst) == min(size, _shorter_side(src))
    except OSError:  # missing or unreadable copy
        return False


def resize_image(src: str, dst: str, size: int, quality: int = QUALITY, force: bool = False) -> bool:
    """Resize so the shorter side is `size` (aspect kept, never enlarged), save as JPEG; False if `dst` was already
    such a copy of `src` (made at this size, not older than `src`) and `force` is off."""
    if not force and _up_to_date(src, dst, size):
        return False
    tmp = f"{dst}.tmp"
    _resized(src, size).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, dst)  # a killed run never leaves a half-written image behind
    return True


def _encode_many(jobs, size, quality=QUALITY) -> list:
    "(id, resized JPEG bytes) of each (source, id) job, for an HDF5 store."
    import io

    out = []
    for src, key in jobs:
        buf = io.BytesIO()
        _resized(src, size).save(buf, "JPEG", quality=quality)
        out.append((key, buf.getvalue()))
    return out


def _resize_many(jobs, size, force=False):
    return sum(resize_image(s, d, size, force=force) for s, d in jobs)


def prepare_dataset(src, out, size: int = 384, workers: int | None = None, images=None, log: Callable = print,
                    store: bool = False) -> dict:
    """Copy `src`'s CSVs to `out` and write its train/test images, resized, to `out/train` and `out/test`.

    Images are resized so their shorter side is `size` (aspect kept; smaller images are copied as they are);
    melafast then squashes them to `size` x `size` when training. The settings are recorded in `out/prepare.json`.
    A rerun skips the copies already made from the same source at the same size, and redoes the others: all of them
    when the recorded size or quality differs, a copy older than its source, or one of another size.
    `store=True` writes each split's images into one HDF5 store instead (`out/train-image.hdf5`, the ISIC 2024
    layout: JPEG bytes under each image's id), every image anew.
    """
    from ..atomic import write_json
    from .tables import load_competition
    from ..progress import progress as shown

    if not 16 <= size <= 4096:
        raise MelafastError(f"--size must be between 16 and 4096, got {size}")
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise MelafastError("--out must differ from --src: prepare never overwrites the originals")
    train, test = load_competition(src, images=images)
    out.mkdir(parents=True, exist_ok=True)
    record, settings = out / RECORD, dict(size=size, quality=QUALITY)
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        before = None
    force = isinstance(before, dict) and {k: before.get(k) for k in settings} != settings
    if force:
        log(f"{out} was prepared with {before.get('size')} px (quality {before.get('quality')}): redoing every image "
            f"at {size} px")
    for csv in src.glob("*.csv"):
        shutil.copy2(csv, out / csv.name)
    if store:
        return _prepare_store(src, out, size, workers, train, test, record, settings, log)
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
    write_json(dict(settings, src=str(src.resolve()), finished=False), record)  # a kill mid-way leaves this mark
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = zip(chunks, pool.map(_resize_many, chunks, [size] * len(chunks), [force] * len(chunks)))
            for _, n in shown(results, total=len(chunks), label="resize (or check)", size=lambda r: len(r[0])):
                done += n
    else:
        for chunk in shown(chunks, total=len(chunks), label="resize (or check)", size=len):
            done += _resize_many(chunk, size, force)
    write_json(dict(settings, src=str(src.resolve()), finished=True, images=len(jobs)), record)
    log(f"{out}: {done} images resized to {size} px (shorter side), {len(jobs) - done} already done")
    return dict(resized=done, skipped=len(jobs) - done, total=len(jobs))
