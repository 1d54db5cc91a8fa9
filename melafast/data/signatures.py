"""What melafast reads from each image's pixels once and caches: a perceptual hash (near-duplicate images: the same
lesion photographed twice, a crop or resize, an image shared between challenge years) and the skin tone around the
lesion as the individual typology angle (ITA, from CIELAB).

Both come from one decode per image at reduced scale and are cached per file (path, size, modification time) under
`$MELAFAST_CACHE` (default `~/.cache/melafast`), so a second run over the same images reads no pixel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DUP_DISTANCE
from ..errors import DataError
from ..layout import cache_dir

__all__ = ["signatures", "near_duplicates", "duplicate_groups", "hamming", "ita", "ita_band", "ITA_BANDS",
           "cross_duplicates", "MIN_YELLOW", "with_signatures", "duplicate_clusters", "duplicate_table",
           "add_skin_tone", "SKIN_TONE_NOTE"]

SIG_VERSION = "2"  # bump when what is computed changes: older cache rows are then recomputed
DECODE = 96  # the side an image is decoded at (JPEG draft) for both figures
# (lower edge in degrees, name), lightest first: Del Bino and Bernerd 2013, as Kinyanjui et al. 2020 used for ISIC
ITA_BANDS = ((55, "very light"), (41, "light"), (28, "intermediate"), (10, "tan"), (-30, "brown"), (-90, "dark"))


def _lab(rgb: np.ndarray) -> np.ndarray:
    "sRGB (..., 3) uint8 -> CIELAB (..., 3), D65 white."
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


MIN_YELLOW = 1.0  # b* below this (a dermoscope's light can leave skin pink or violet) is read as this


def ita(rgb: np.ndarray) -> float:
    """The individual typology angle (degrees) of the skin around a centred lesion: CIELAB of the outer ring of the
    image (the outer fifth on each side), keeping pixels lighter than the ring's median (the lesion and hair are
    darker) and leaving out near-black vignette corners and specular highlights; ITA = arctan((L* - 50) / b*) of
    their median L* and b*, with b* read as at least `MIN_YELLOW` (where the light leaves no yellow to measure, the
    angle then says how light the skin is: near +90 degrees above L* 50, near -90 below). NaN when too few pixels
    are left to measure."""
    lab = _lab(rgb)
    h, w = lab.shape[:2]
    ring = np.ones((h, w), dtype=bool)
    ring[h // 5: h - h // 5, w // 5: w - w // 5] = False
    px = lab[ring]
    px = px[(px[:, 0] > 15) & (px[:, 0] < 97)]
    if len(px) < 10:
        return float("nan")
    px = px[px[:, 0] >= np.median(px[:, 0])]
    light, yellow = float(np.median(px[:, 0])), float(np.median(px[:, 2]))
    return float(np.degrees(np.arctan((light - 50.0) / max(yellow, MIN_YELLOW))))


def ita_band(angle) -> pd.Series:
    "ITA bands (very light ... dark; 'unknown' where no ITA), an ordered categorical."
    angle = pd.to_numeric(pd.Series(angle), errors="coerce")
    names = [n for _, n in ITA_BANDS]
    out = pd.Series("unknown", index=angle.index, dtype=object)
    for low, name in reversed(ITA_BANDS):  # darkest first: each lighter band overwrites from its lower edge
        out[angle > low] = name
    out[angle <= ITA_BANDS[-1][0]] = names[-1]
    return pd.Series(pd.Categorical(out, categories=[*names, "unknown"], ordered=True), index=angle.index)


def _one(fname) -> tuple[str, float]:
    import imagehash
    from PIL import Image

    from .store import open_image

    try:
        im = Image.open(open_image(fname))
        if im.format == "JPEG":
            im.draft("RGB", (DECODE, DECODE))
        im = im.convert("RGB")
        h = str(imagehash.phash(im, hash_size=16))
        small = np.asarray(im.resize((DECODE, DECODE), Image.BILINEAR))
        return h, ita(small)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {fname} ({str(e).splitlines()[0][:80]})") from None


def _stamp(fname) -> str:
    from .store import is_stored, split_name

    path = split_name(fname)[0] if is_stored(fname) else fname
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}-{SIG_VERSION}"


def signatures(fnames, workers: int = 8, progress: bool = True, label: str = "image signatures") -> pd.DataFrame:
    """fname, phash (64 hex digits: 256 bits), ita (degrees) of every image in `fnames`, from the cache where it is
    current."""
    from concurrent.futures import ThreadPoolExecutor

    from ..atomic import write_csv
    from ..progress import progress as shown

    fnames = [str(f) for f in fnames]
    stamps = [_stamp(f) for f in fnames]
    key = hashlib.sha1("\n".join(sorted({os.path.dirname(f) for f in fnames})).encode()).hexdigest()[:16]
    cache = cache_dir() / "signatures" / f"{key}.csv"
    known = {}
    if cache.is_file():
        try:
            old = pd.read_csv(cache, dtype={"fname": str, "stamp": str, "phash": str})
            known = {(r.fname, r.stamp): (r.phash, r.ita) for r in old.itertuples()}
        except (OSError, ValueError, AttributeError):
            known = {}
    todo = [i for i, k in enumerate(zip(fnames, stamps)) if k not in known]
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
            done = list(shown(pool.map(_one, [fnames[i] for i in todo], chunksize=32), total=len(todo), label=label,
                              display=progress and len(todo) > 500))
        for i, sig in zip(todo, done):
            known[(fnames[i], stamps[i])] = sig
        rows = pd.DataFrame([dict(fname=f, stamp=s, phash=h, ita=a) for (f, s), (h, a) in known.items()])
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_csv(rows, cache)
        except OSError:  # a read-only home: the signatures are still returned
            pass
    got = [known[k] for k in zip(fnames, stamps)]
    return pd.DataFrame({"fname": fnames, "phash": [g[0] for g in got], "ita": [float(g[1]) for g in got]})


HASH_BITS = 256  # pHash of a 16 x 16 block of DCT coefficients: 64 bits let too many distinct lesions collide
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _bytes(hexes) -> np.ndarray:
    "Hashes (hex strings) as an (n, 32) uint8 array."
    return np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hexes], dtype=np.uint8).reshape(
        len(hexes), HASH_BITS // 8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    "Bits that differ between hashes given as uint8 byte arrays (..., 32), broadcast over the leading axes."
    return _POPCOUNT[np.bitwise_xor(a, b)].sum(axis=-1, dtype=np.int64)


def near_duplicates(phashes, distance: int = DUP_DISTANCE) -> pd.DataFrame:
    """Every pair (i, j, distance), i < j, of hashes at most `distance` bits apart (`distance` < 32). Two hashes within
    `distance` bits agree exactly on at least one of `distance + 1` disjoint blocks of their 32 bytes (pigeonhole),
    so only images that share a block are compared: exact, and far fewer comparisons than every pair."""
    if not 0 <= distance < HASH_BITS // 8:
        raise DataError(f"a near-duplicate distance must be 0 to {HASH_BITS // 8 - 1} bits, got {distance}")
    data = _bytes(list(phashes))
    n = len(data)
    edges = np.linspace(0, HASH_BITS // 8, distance + 2).astype(int)
    found = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        keys = np.zeros(n, dtype=np.int64)
        for col in range(lo, hi):
            keys = keys * 256 + data[:, col]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            idx = np.sort(order[s: s + size])
            d = hamming(data[idx][:, None, :], data[idx][None, :, :])
            a, b = np.nonzero(np.triu(d <= distance, k=1))
            found.update(((int(idx[i]), int(idx[j])), int(d[i, j])) for i, j in zip(a, b))
    return pd.DataFrame([(i, j, d) for (i, j), d in sorted(found.items())], columns=["i", "j", "distance"]).astype(int)


def duplicate_groups(n: int, pairs: pd.DataFrame) -> np.ndarray:
    "A group number per item: items joined by `pairs` (transitively) share one; the others stand alone."
    from .folds import join_groups

    return join_groups(n, pairs["i"], pairs["j"])


def cross_duplicates(new: pd.DataFrame, known: pd.DataFrame, distance: int = DUP_DISTANCE) -> pd.DataFrame:
    """The rows of `new` whose image is a near-duplicate of one in `known` (both with `image_name` and `phash`):
    image_name, its closest duplicate (`duplicate_of`) and the distance in bits; one row per image of `new`."""
    both = pd.concat([new[["image_name", "phash"]], known[["image_name", "phash"]]], ignore_index=True)
    pairs = near_duplicates(both["phash"], distance)
    pairs = pairs[(pairs["i"] < len(new)) & (pairs["j"] >= len(new))]  # i < j: i from `new`, j from `known`
    pairs = pairs.sort_values("distance", kind="stable").drop_duplicates("i")
    return pd.DataFrame({"image_name": both["image_name"].to_numpy()[pairs["i"]],
                         "duplicate_of": both["image_name"].to_numpy()[pairs["j"]],
                         "distance": pairs["distance"].to_numpy()}).reset_index(drop=True)


def with_signatures(df: pd.DataFrame, workers: int = 8, progress: bool = True) -> pd.DataFrame:
    "`df` (with `fname`) with each image's `phash` and `ita` added (computed once, then read from the cache)."
    sig = signatures(df["fname"], workers=workers, progress=progress)
    return df.drop(columns=["phash", "ita"], errors="ignore").assign(phash=sig["phash"].to_numpy(),
                                                                      ita=sig["ita"].to_numpy())


def duplicate_clusters(df: pd.DataFrame, distance: int = DUP_DISTANCE) -> pd.Series:
    """A cluster number for each row (with `phash`) whose image has a near-duplicate among the rows, joined
    transitively; missing for the rows that have none."""
    pairs = near_duplicates(df["phash"], distance)
    groups = pd.Series(duplicate_groups(len(df), pairs), index=df.index)
    sizes = groups.map(groups.value_counts())
    return groups.where(sizes > 1).astype("Int64")


def _images_of(folder: Path) -> pd.DataFrame:
    "The images of a dataset folder (its train and test tables) or of a plain image folder, with where they come from."
    from ..layout import split_csv
    from .tables import image_folder, load_split

    parts = []
    for split in ("train", "test"):
        if split_csv(folder, split).is_file():
            t = load_split(folder, split)
            if t is not None:
                parts.append(t[["image_name", "fname"]].assign(split=split))
    if not parts:
        parts.append(image_folder(folder)[["image_name", "fname"]].assign(split="images"))
    return pd.concat(parts, ignore_index=True).assign(dataset=str(folder))


def duplicate_table(folders, distance: int = DUP_DISTANCE, workers: int = 8, progress: bool = True) -> pd.DataFrame:
    """Every near-duplicate group among the images of `folders` (dataset folders or image folders): one row per image
    in a group of two or more, with `group`, `dataset`, `split`, `image_name`, `distance` (bits from the group's
    first image) and `fname`; the largest groups first."""
    rows = pd.concat([_images_of(Path(f)) for f in folders], ignore_index=True)
    rows = with_signatures(rows, workers=workers, progress=progress)
    rows["group"] = duplicate_clusters(rows, distance)
    rows = rows[rows["group"].notna()].copy()
    if rows.empty:
        return pd.DataFrame(columns=["group", "dataset", "split", "image_name", "distance", "fname"])
    size = rows.groupby("group")["image_name"].transform("size")
    rows = rows.assign(_size=size).sort_values(["_size", "group"], ascending=[False, True], kind="stable")
    rows["group"] = pd.factorize(rows["group"])[0]
    first = rows.groupby("group")["phash"].transform("first")
    rows["distance"] = hamming(_bytes(rows["phash"]), _bytes(first))
    return rows[["group", "dataset", "split", "image_name", "distance", "fname"]].reset_index(drop=True)


SKIN_TONE_NOTE = ("Skin tone is estimated from each image, not recorded: the individual typology angle (ITA, from "
                  "CIELAB L* and b*) of the skin around the lesion (the image's outer ring, lighter half), in Del "
                  "Bino's bands, as Kinyanjui et al. 2020 did for ISIC images. A dermoscope's own light and the "
                  "camera's colour processing shift both values (skin left without measurable yellow is read at the "
                  "light end), the patch is small, and ITA bands are not Fitzpatrick types: read these groups as "
                  "indicative, and as a count of how few darker-skinned patients the data holds.")


def add_skin_tone(df: pd.DataFrame, workers: int = 8, progress: bool = True) -> pd.DataFrame:
    "`df` with `ita` (degrees) and its band `skin_tone` (see `ita_band`), when it has image paths (`fname`)."
    if "fname" not in df.columns or df["fname"].isna().any():
        return df
    if "ita" not in df.columns:
        df = df.assign(ita=signatures(df["fname"], workers=workers, progress=progress)["ita"].to_numpy())
    return df.assign(skin_tone=ita_band(df["ita"]))
