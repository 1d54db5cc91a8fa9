"""Images kept in one HDF5 file (the ISIC 2024 layout: `train-image.hdf5`, the JPEG bytes of each image under its
id), read by id with one lazily opened handle per process (each DataLoader worker opens its own; nothing reads the
whole file).

An image in a store is named by `fname = "<store path>::<id>"`; every reader of images (`open_image`,
`read_bytes`, `file_size`) takes such names and ordinary paths alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["STORE_SUFFIXES", "is_stored", "stored_name", "split_name", "read_bytes", "open_image", "file_size",
           "store_ids", "write_store", "find_store"]

STORE_SUFFIXES = (".hdf5", ".h5")
SEP = "::"
_HANDLES: dict = {}  # (process id, store path) -> open h5py.File


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("images in an HDF5 store need h5py: pip install h5py (or melafast[hdf5])") from None
    return h5py


def is_stored(fname) -> bool:
    "True for the name of an image inside an HDF5 store."
    return isinstance(fname, str) and SEP in fname and fname.split(SEP, 1)[0].lower().endswith(STORE_SUFFIXES)


def stored_name(store, key: str) -> str:
    return f"{Path(store)}{SEP}{key}"


def split_name(fname: str) -> tuple[str, str]:
    store, key = fname.split(SEP, 1)
    return store, key


def _handle(store: str):
    "This process's read handle on `store`, opened on first use (a forked worker never reuses its parent's)."
    key = (os.getpid(), store)
    f = _HANDLES.get(key)
    if f is None:
        try:
            f = _h5py().File(store, "r")
        except OSError as e:
            raise DataError(f"cannot open the image store {store} ({e})") from None
        _HANDLES[key] = f
    return f


def read_bytes(fname) -> bytes:
    "The encoded image (JPEG, PNG, ...) of `fname`: a file's bytes, or the bytes stored under its id."
    if not is_stored(fname):
        with open(fname, "rb") as f:
            return f.read()
    store, key = split_name(fname)
    try:
        value = _handle(store)[key][()]
    except KeyError:
        raise DataError(f"the image store {store} has no image {key!r}") from None
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.void):
        return value.tobytes()
    return np.asarray(value).tobytes()


def open_image(fname):
    "What PIL's `Image.open` takes for `fname`: the path itself, or the stored bytes as a file object."
    return io.BytesIO(read_bytes(fname)) if is_stored(fname) else fname


def file_size(fname) -> int:
    "Bytes of the encoded image: the file's size, or the stored bytes' length."
    if not is_stored(fname):
        return os.path.getsize(fname)
    store, key = split_name(fname)
    try:
        ds = _handle(store)[key]
    except KeyError:
        raise DataError(f"the image store {store} has no image {key!r}") from None
    return int(ds.nbytes) if ds.dtype.kind != "O" else len(read_bytes(fname))


def store_ids(store) -> set:
    "Every image id in `store`."
    with _h5py().File(store, "r") as f:
        return set(f.keys())


def find_store(root: Path, split: str) -> Path | None:
    "The HDF5 store of `split` in the dataset folder `root` (`train-image.hdf5`, as ISIC 2024 ships it), if any."
    for suffix in STORE_SUFFIXES:
        path = Path(root) / f"{split}-image{suffix}"
        if path.is_file():
            return path
    return None


def write_store(path, items) -> int:
    """Write the (id, encoded image bytes) pairs of `items` into a new HDF5 store at `path`, as ISIC 2024 does (one
    scalar bytes dataset per id); atomically (a killed write leaves no store). Returns how many."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with h5py.File(tmp, "w") as f:
        for key, data in items:
            f.create_dataset(str(key), data=np.void(bytes(data)))
            n += 1
    os.replace(tmp, path)
    return n
