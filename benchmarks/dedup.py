"""How well the perceptual hash finds the same lesion, and how fast: HAM10000 photographs many lesions more than
once (its `patient_id` is the lesion), so a pair of images of one lesion is a true near-duplicate and a pair of two
lesions is not.

For each distance (bits of the 256-bit pHash), every pair of images at most that far apart:
  pairs         how many
  precision     the share of them that are two images of one lesion
  recall        the share of all same-lesion pairs found
and, for --copies images, how many of their copies are found at that distance: "resized" (to 75%, re-encoded at
JPEG quality 80: an archive image shared again at another size) and "edited" (also 4% cropped from each side and 5%
brighter). Plus the time
to hash (decode at reduced scale, pHash, skin tone) per 10,000 images, with an empty cache, and the
time to find the pairs.

    python benchmarks/dedup.py --distances 8 16 20 24 28 31
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--distances", type=int, nargs="+", default=[8, 16, 20, 24, 28, 31])
    p.add_argument("--images", type=int, default=None, help="only the first N images (default all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--copies", type=int, default=300, help="images given an edited copy (recall of copies)")
    a = p.parse_args(argv)
    if not HAM.is_dir():
        sys.exit(f"{HAM} is needed")
    os.environ["MELAFAST_CACHE"] = tempfile.mkdtemp(prefix="dedup-cache-")  # an empty cache: hashing is timed
    from melafast.data.signatures import near_duplicates, signatures

    table = pd.read_csv(HAM / "train.csv")
    if a.images:
        table = table.head(a.images)
    fnames = [str(HAM / "images" / f"{n}.jpg") for n in table["image_name"]]
    t0 = time.time()
    sig = signatures(fnames, workers=a.workers, progress=False)
    hash_s = time.time() - t0
    lesion = table["patient_id"].to_numpy()
    counts = pd.Series(lesion).value_counts()
    same_total = int((counts * (counts - 1) // 2).sum())
    print(f"{len(table)} images, {counts.size} lesions, {same_total} same-lesion pairs; hashing {hash_s:.1f} s with "
          f"{a.workers} threads = {hash_s / len(table) * 10_000:.1f} s per 10,000 images")
    print("| distance | pairs | same lesion | precision | recall | matching time |")
    print("|---|---|---|---|---|---|")
    for d in a.distances:
        t0 = time.time()
        pairs = near_duplicates(sig["phash"], d)
        took = time.time() - t0
        same = int((lesion[pairs["i"]] == lesion[pairs["j"]]).sum()) if len(pairs) else 0
        prec = same / len(pairs) if len(pairs) else float("nan")
        print(f"| {d} | {len(pairs)} | {same} | {prec:.3f} | {same / same_total:.3f} | {took:.2f} s |")
    from PIL import Image, ImageEnhance

    originals, kinds = fnames[: a.copies], {}
    for kind in ("resized", "edited"):
        work = Path(tempfile.mkdtemp(prefix=f"dedup-{kind}-"))
        for f in originals:
            im = Image.open(f).convert("RGB")
            w, h = im.size
            if kind == "edited":
                im = im.crop((int(0.04 * w), int(0.04 * h), int(0.96 * w), int(0.96 * h)))
            im = im.resize((int(0.75 * im.size[0]), int(0.75 * im.size[1])), Image.BILINEAR)
            if kind == "edited":
                im = ImageEnhance.Brightness(im).enhance(1.05)
            im.save(work / Path(f).name, quality=80)
        copies = signatures([str(work / Path(f).name) for f in originals], workers=a.workers, progress=False)
        kinds[kind] = pd.concat([sig.head(a.copies), copies], ignore_index=True)
    print(f"| distance | resized copies found (of {a.copies}) | edited copies found |")
    print("|---|---|---|")
    for d in a.distances:
        cells = []
        for both in kinds.values():
            pairs = near_duplicates(both["phash"], d)
            found = int(((pairs["j"] - pairs["i"]) == a.copies).sum())  # original i, its copy i + copies
            cells.append(f"{found} ({found / a.copies:.0%})")
        print(f"| {d} | " + " | ".join(cells) + " |")
    itas = sig["ita"].dropna()
    print(f"skin tone: ITA found for {len(itas)} of {len(sig)} images, median {np.median(itas):.1f} degrees")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
