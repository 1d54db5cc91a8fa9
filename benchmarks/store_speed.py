"""Decoding speed of the same images from a JPEG folder and from an HDF5 store (the ISIC 2024 layout): each image
read, decoded and squashed to --size through melafast's inference DataLoader, as prediction and validation read
them. Prints one JSON object: images/s from each, best of --repeats.

    python benchmarks/store_speed.py --images 2000 --size 224 --workers 2     # HAM10000 from ../shared
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _emit import emit

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _rate(df, size, bs, workers, repeats) -> float:
    from melafast.data import inference_dl

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(b[0]) for b in inference_dl(df, size, bs=bs, num_workers=workers, device="cpu"))
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "ham10000"), help="dataset folder with train.csv")
    p.add_argument("--images", type=int, default=1000, help="the first N images of train.csv")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if not Path(a.data, "train.csv").is_file():
        print(json.dumps({"skipped": f"needs {a.data}/train.csv"}))
        return {}
    from melafast.data import load_competition
    from melafast.data.store import read_bytes, write_store

    folder = load_competition(a.data)[0].head(a.images)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "train-image.hdf5"
        write_store(store, ((n, read_bytes(f)) for n, f in zip(folder["image_name"], folder["fname"])))
        stored = folder.assign(fname=[f"{store}::{n}" for n in folder["image_name"]])
        res = dict(images=len(folder), size=a.size, workers=a.workers, store_mb=round(store.stat().st_size / 2**20, 1),
                   folder_img_s=_rate(folder, a.size, a.bs, a.workers, a.repeats),
                   store_img_s=_rate(stored, a.size, a.bs, a.workers, a.repeats))
    res["store_vs_folder"] = round(res["store_img_s"] / res["folder_img_s"], 2)
    return emit(res, a.out)


if __name__ == "__main__":
    main()
