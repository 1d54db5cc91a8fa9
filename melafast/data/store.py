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
           "store_ids", "write_store", "find_store", "StoreIndex", "store_index", "index_stores"]

STORE_SUFFIXES = (".hdf5", ".h5")
SEP = "::"
_HANDLES: dict = {}  # (process id, store file) -> open h5py.File
_FDS: dict = {}  # (process id, store file) -> file descriptor for os.pread
_INDEXES: dict = {}  # store file -> StoreIndex (read-only numpy arrays: forked workers share the pages)


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


def _file(store) -> tuple:
    "What identifies the store's current file: (path, inode, size, modification time); a rewritten store is another."
    try:
        st = os.stat(store)
    except OSError as e:
        raise DataError(f"cannot open the image store {store} ({e})") from None
    return str(store), st.st_ino, st.st_size, st.st_mtime_ns


def _handle(store: str, file: tuple | None = None):
    "This process's h5py handle on `store`, opened on first use (a forked worker never reuses its parent's)."
    key = (os.getpid(), file or _file(store))
    f = _HANDLES.get(key)
    if f is None:
        try:
            f = _h5py().File(store, "r")
        except OSError as e:
            raise DataError(f"cannot open the image store {store} ({e})") from None
        _HANDLES[key] = f
    return f


def _fd(store: str, file: tuple) -> int:
    "This process's descriptor on the store's current file (one of a file since rewritten is closed)."
    key = (os.getpid(), file)
    fd = _FDS.get(key)
    if fd is None:
        for old in [k for k in _FDS if k[0] == key[0] and k[1][0] == file[0]]:
            os.close(_FDS.pop(old))
        fd = _FDS[key] = os.open(store, os.O_RDONLY)
    return fd


class StoreIndex:
    """Where each image's bytes sit in a store file: the ids sorted (UTF-8 bytes), the byte offset and length of each
    one's data; offset -1 for data HDF5 must read itself (chunked, compressed, variable-length)."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, sorted_: bool = False):
        order = slice(None) if sorted_ else np.argsort(keys, kind="stable")
        self.keys, self.offsets, self.sizes = keys[order], offsets[order], sizes[order]

    def __len__(self):
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.offsets.nbytes + self.sizes.nbytes

    def position(self, key: str) -> int:
        "The row of `key`, -1 when the store has no such image."
        k = key.encode()
        i = int(np.searchsorted(self.keys, k))
        return i if i < len(self.keys) and self.keys[i] == k else -1

    def contains(self, names) -> np.ndarray:
        "Whether each of `names` is an id of the store (vectorised)."
        k = np.array([str(n).encode() for n in names], dtype=bytes)
        if not len(k):
            return np.zeros(0, dtype=bool)
        i = np.minimum(np.searchsorted(self.keys, k), max(len(self.keys) - 1, 0))
        return (self.keys[i] == k) if len(self.keys) else np.zeros(len(k), dtype=bool)

    def ids(self) -> list:
        return [k.decode() for k in self.keys]

    @classmethod
    def build(cls, store) -> "StoreIndex":
        "Read every id's place from the store (a dataset header each: about 25 us per image)."
        h5py = _h5py()
        with h5py.File(store, "r") as f:
            names = list(f.keys())
            offsets, sizes = np.full(len(names), -1, np.int64), np.zeros(len(names), np.int64)
            for i, name in enumerate(names):
                try:
                    d = h5py.h5d.open(f.id, name.encode())
                except (KeyError, ValueError, TypeError):
                    continue  # a group, not an image: read (and refused) through h5py
                plist = d.get_create_plist()
                if (d.dtype.kind in "VS" or d.dtype == np.uint8) and plist.get_layout() == h5py.h5d.CONTIGUOUS \
                        and plist.get_nfilters() == 0 and d.get_offset() is not None:
                    offsets[i], sizes[i] = d.get_offset(), d.get_storage_size()
        return cls(np.array([n.encode() for n in names], dtype=bytes) if names else np.zeros(0, "S1"), offsets, sizes)


def store_index(store, file: tuple | None = None) -> StoreIndex:
    """The index of `store` (see the module's note): kept for the process, loaded from the cache, or built (and
    cached) the first time. `file`: the store's `_file`, when the caller has it."""
    file = file or _file(store)
    idx = _INDEXES.get(file)
    if idx is not None:
        return idx
    import hashlib

    from ..layout import cache_dir

    cached = cache_dir() / "store-index" / (hashlib.sha256(repr(file).encode()).hexdigest()[:32] + ".npz")
    try:
        with np.load(cached, allow_pickle=False) as z:
            idx = StoreIndex(z["keys"], z["offsets"], z["sizes"], sorted_=True)
    except Exception:  # no cached index, or a damaged one: build it
        idx = StoreIndex.build(store)
        try:
            from ..atomic import atomic_path

            with atomic_path(cached) as tmp:
                with open(tmp, "wb") as out:
                    np.savez(out, keys=idx.keys, offsets=idx.offsets, sizes=idx.sizes)
        except OSError:
            pass  # an unwritable cache: the index is built again next time
    for old in [k for k in _INDEXES if k[0] == file[0]]:  # the same path's earlier file, since rewritten
        del _INDEXES[old]
    _INDEXES[file] = idx
    return idx


def index_stores(fnames) -> None:
    """Index (or load the index of) every store `fnames` name, in this process: DataLoader workers forked after it
    share the index instead of each loading its own."""
    stores = {f.split(SEP, 1)[0] for f in fnames if isinstance(f, str) and SEP in f}
    for store in stores:
        if store.lower().endswith(STORE_SUFFIXES):
            store_index(store)


def read_bytes(fname) -> bytes:
    "The encoded image (JPEG, PNG, ...) of `fname`: a file's bytes, or the bytes stored under its id."
    if not is_stored(fname):
        with open(fname, "rb") as f:
            return f.read()
    store, key = split_name(fname)
    file = _file(store)
    idx = store_index(store, file)
    i = idx.position(key)
    if i < 0:
        raise DataError(f"the image store {store} has no image {key!r}")
    if idx.offsets[i] >= 0:
        return os.pread(_fd(store, file), int(idx.sizes[i]), int(idx.offsets[i]))
    try:
        value = _handle(store, file)[key][()]
    except (KeyError, TypeError):
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
    idx = store_index(store)
    i = idx.position(key)
    if i < 0:
        raise DataError(f"the image store {store} has no image {key!r}")
    return int(idx.sizes[i]) if idx.offsets[i] >= 0 else len(read_bytes(fname))


def store_ids(store) -> list:
    "Every image id in `store`, sorted."
    return store_index(store).ids()


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
