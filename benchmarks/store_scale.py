"""ISIC 2024 at its own scale: a 400,000-image HDF5 store read as training reads it, against the same JPEGs in a folder.

Generates --n small synthetic JPEGs once (drawn lesions about 130 px across, 3-4 KB each, like the 2024 crops) into
--work (a temporary folder by default; never committed): as files, and as one store in the ISIC 2024 layout
(`write_store`: one dataset per id). Then:

  index_build_s    the store's index built the first time (each id's byte offset; cached under $MELAFAST_CACHE)
  index_load_s     the cached index loaded, as every later process does
  index_mb         the index in memory
  table_mb         a 2024-like table of --n rows (ids, patients, 40 numeric and 6 text columns, fname), pandas deep size
  dls_peak_mb      peak memory allocated (tracemalloc) while the training DataLoaders of one fold are built from that
                   table, with --neg-per-pos 1 (fastai's Datasets keep the table itself, not one object per row)
  dls_kept_mb      what those DataLoaders still hold once built
  read             images/s (and per worker) reading --reads ids drawn at random across the whole store, decoded and
                   squashed to --size by melafast's inference DataLoader, from the folder and from the store, for
                   each --workers count (best of --repeats)

    python benchmarks/store_scale.py --n 400000 --reads 20000 --workers 0 1 2 --work /tmp/store400k
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import tracemalloc
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from _emit import emit


def _jpeg(i: int) -> bytes:
    "A drawn lesion, different for every i: a skin-toned background, a darker ellipse, a little noise."
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(i)
    side = int(rng.integers(120, 140))
    skin = tuple(int(c) for c in rng.integers([170, 120, 100], [230, 180, 160]))
    im = Image.new("RGB", (side, side), skin)
    d = ImageDraw.Draw(im)
    r = rng.integers(15, 45, 2)
    c = rng.integers(40, side - 40, 2)
    d.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=tuple(int(x) for x in rng.integers(40, 120, 3)))
    im = im.filter(ImageFilter.GaussianBlur(2))
    noise = rng.normal(0, 4, (side, side, 3))
    im = Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def _write_files(args):
    folder, lo, hi = args
    for i in range(lo, hi):
        Path(folder, f"ISIC_{i:07d}.jpg").write_bytes(_jpeg(i))


def generate(work: Path, n: int) -> tuple[Path, Path]:
    "The --n JPEGs as files (made in parallel) and as a store; reused when --work already holds them."
    from melafast.data.store import write_store

    folder, store = work / "images", work / "train-image.hdf5"
    done = work / f"generated-{n}"
    if done.is_file():
        return folder, store
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 5000
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_files, [(str(folder), lo, min(lo + step, n)) for lo in range(0, n, step)])
    t1 = time.perf_counter()
    write_store(store, ((f"ISIC_{i:07d}", (folder / f"ISIC_{i:07d}.jpg").read_bytes()) for i in range(n)))
    print(f"generated {n} JPEGs in {t1 - t0:.0f} s, the store in {time.perf_counter() - t1:.0f} s "
          f"({store.stat().st_size / 2**30:.2f} GiB)", flush=True)
    done.write_text("")
    return folder, store


def table(n: int, store: Path, seed: int = 0) -> pd.DataFrame:
    "A 2024-like training table of n rows: 0.1% malignant, about 1,000 patients, 40 numbers, 6 text columns."
    rng = np.random.default_rng(seed)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    patients = rng.integers(0, max(n // 400, 10), n)
    df = pd.DataFrame({"image_name": ids, "patient_id": [f"IP_{p:07d}" for p in patients],
                       "target": (rng.random(n) < 0.001).astype(int)})
    df.loc[df.index[:2], "target"] = 1  # at least one melanoma in each fold
    for j in range(40):
        df[f"tbp_lv_{j}"] = rng.normal(size=n)
    for name, values in (("sex", ["male", "female"]), ("anatom_site_general", ["head/neck", "upper extremity",
                         "lower extremity", "posterior torso", "anterior torso"]), ("attribution", list("ABCDEFG")),
                         ("tbp_tile_type", ["3D: white", "3D: XP"]), ("tbp_lv_location", [f"loc{k}" for k in range(21)]),
                         ("image_type", ["TBP tile: close-up"])):
        df[name] = np.array(values, dtype=object)[rng.integers(0, len(values), n)]
    df["age_approx"] = rng.integers(20, 85, n).astype(float)
    df["fname"] = [f"{store}::{i}" for i in ids]
    df["fold"] = patients % 5
    return df


def _rate(df, size, workers, repeats) -> float:
    from melafast.data import inference_dl

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(b[0]) for b in inference_dl(df, size, bs=64, num_workers=workers, device="cpu"))
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400_000)
    p.add_argument("--reads", type=int, default=20_000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keeps the generated images (default: a temporary folder)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="store_scale-"))
    os.environ.setdefault("MELAFAST_CACHE", str(work / "cache"))
    folder, store = generate(work, a.n)
    from melafast.data import store as st
    from melafast.data.blocks import melanoma_dls

    for f in Path(os.environ["MELAFAST_CACHE"], "store-index").glob("*.npz"):
        f.unlink()  # the first build, measured
    t0 = time.perf_counter()
    idx = st.store_index(store)
    res = dict(images=a.n, store_gib=round(store.stat().st_size / 2**30, 2), index_build_s=round(time.perf_counter() - t0, 1))
    st._INDEXES.clear()
    t0 = time.perf_counter()
    idx = st.store_index(store)
    res.update(index_load_s=round(time.perf_counter() - t0, 2), index_mb=round(idx.nbytes / 2**20, 1),
               index_bytes=idx.nbytes)

    df = table(a.n, store)
    res["table_mb"] = round(df.memory_usage(deep=True).sum() / 2**20, 1)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dls = melanoma_dls(df, fold=0, size=a.size, bs=64, meta=True, num_workers=0, device="cpu", neg_per_pos=1,
                       cat_names=["sex", "anatom_site_general"], cont_names=["age_approx", "tbp_lv_0", "tbp_lv_1"])
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res.update(dls_peak_mb=round((peak - before) / 2**20, 1), dls_kept_mb=round((kept - before) / 2**20, 1))
    del dls

    rows = df.iloc[np.random.default_rng(1).choice(a.n, a.reads, replace=False)].reset_index(drop=True)
    files = rows.assign(fname=[str(folder / f"{i}.jpg") for i in rows["image_name"]])
    _rate(rows.head(2000), a.size, 0, 1)  # warm the page cache for both (the store file and the files)
    _rate(files.head(2000), a.size, 0, 1)
    res["read"] = []
    for w in a.workers:
        f_rate, s_rate = _rate(files, a.size, w, a.repeats), _rate(rows, a.size, w, a.repeats)
        res["read"].append(dict(workers=w, folder_img_s=f_rate, store_img_s=s_rate,
                                folder_per_worker=round(f_rate / max(w, 1), 1),
                                store_per_worker=round(s_rate / max(w, 1), 1),
                                store_vs_folder=round(s_rate / f_rate, 2)))
        print(res["read"][-1], flush=True)
    return emit(res, a.out)


if __name__ == "__main__":
    main()
