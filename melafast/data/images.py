"""Images: check that files are usable before training, and open them (fast, as RGB) while training."""

from __future__ import annotations


import numpy as np
import pandas as pd
from fastai.vision.core import PILImage

from ..config import BAD_IMAGE_MODES
from ..errors import DataError

__all__ = ["check_images"]



def _image_problem(fname: str) -> str | None:
    "Why `fname` cannot be used as an image, or None when it can (empty, unreadable, truncated JPEG)."
    from PIL import Image, UnidentifiedImageError

    from .store import file_size, is_stored, open_image, read_bytes

    try:
        size = file_size(fname)
        if size == 0:
            return "empty file" if not is_stored(fname) else "empty image in the store"
        with Image.open(open_image(fname)) as im:
            fmt = im.format
            if fmt == "PNG":
                im.verify()  # reads every chunk and checks its CRC
        if fmt == "JPEG":
            if is_stored(fname):
                tail = read_bytes(fname)[-1024:]
            else:
                with open(fname, "rb") as f:
                    f.seek(max(0, size - 1024))
                    tail = f.read()
            if b"\xff\xd9" not in tail:  # a complete JPEG ends with the EOI marker
                return "truncated JPEG"
    except DataError as e:
        return str(e)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({str(e).splitlines()[0][:80]})"
    return None


def check_images(df: pd.DataFrame, on_bad: str = "error", workers: int = 8, progress: bool = True):
    """Check every `fname` of `df` is a usable image: not empty, readable, not a truncated JPEG.

    `on_bad="error"` raises one `DataError` listing the bad files; `"skip"` drops them.
    Returns `(good_rows, bad)` where `bad` is a DataFrame of image_name, fname, problem.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..progress import progress as shown

    if on_bad not in BAD_IMAGE_MODES:
        raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_MODES)}, got {on_bad!r}")
    fnames = df["fname"].tolist()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # file reads and PIL header parsing release the GIL
        problems = list(shown(pool.map(_image_problem, fnames, chunksize=64), total=len(fnames),
                              label="image check", display=progress and len(fnames) > 1000))
    is_bad = np.array([p is not None for p in problems], dtype=bool)
    bad = pd.DataFrame({"image_name": df["image_name"].to_numpy()[is_bad], "fname": np.asarray(fnames, dtype=object)[is_bad],
                        "problem": [p for p in problems if p is not None]})
    if len(bad) and on_bad == "error":
        listed = "; ".join(f"{r.fname} ({r.problem})" for r in bad.head(3).itertuples())
        raise DataError(f"{len(bad)} of {len(df)} images cannot be used: {listed}{' ...' if len(bad) > 3 else ''}. "
                        "Replace them, or leave them out with --on-bad-image skip (on_bad_image='skip')")
    return df[~is_bad], bad



class OpenImage:
    "Open an image as RGB, letting JPEG decode at a reduced scale when the file is much larger than `size`."

    def __init__(self, size=None):
        self.size = size

    def __call__(self, fn):
        from PIL import Image

        from .store import open_image

        try:
            im = Image.open(open_image(fn))
            if self.size and im.format == "JPEG":
                im.draft("RGB", (self.size, self.size))  # decodes at 1/2, 1/4 or 1/8 scale, never below size
            return PILImage(im.convert("RGB"))  # grayscale, RGBA, palette PNGs: all become RGB
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {fn} ({str(e).splitlines()[0][:80]}); check the images first with "
                            "melafast.data.check_images, or use --on-bad-image skip") from None
