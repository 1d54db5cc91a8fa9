"""Images from an HDF5 store (the ISIC 2024 layout): found, checked, read by id in DataLoader workers, and trained
on with the same figures as the JPEG folder they came from."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HAM, TINY, _cli_args, needs_ham
from typer.testing import CliRunner

from melafast.cli import app
from melafast.data.store import read_bytes, write_store


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _as_store(src, dest, splits=("train", "test"), images=None):
    "A copy of the dataset `src` with each split's images (their original bytes) in `dest/<split>-image.hdf5`."
    from melafast.data import load_split

    dest.mkdir()
    for split in splits:
        df = load_split(src, split, images=images)
        if df is None:
            continue
        pd.read_csv(src / f"{split}.csv").to_csv(dest / f"{split}.csv", index=False)
        write_store(dest / f"{split}-image.hdf5", ((n, read_bytes(f)) for n, f in zip(df["image_name"], df["fname"])))
    return dest


def test_a_run_from_the_store_matches_the_run_from_the_folder(tiny_run, sample_dir, tmp_path):
    from melafast.data import load_competition

    data = _as_store(sample_dir, tmp_path / "stored")
    train, test = load_competition(data)
    assert train["fname"].iloc[0] == f"{(data / 'train-image.hdf5').resolve()}::{train['image_name'].iloc[0]}"
    assert len(test) == 16
    res = invoke(*_cli_args({"data": data, **TINY, "out": tmp_path / "run"}))
    assert res.exit_code == 0, res.output
    got, want = pd.read_csv(tmp_path / "run" / "oof.csv"), pd.read_csv(tiny_run / "oof.csv")
    assert got["image_name"].tolist() == want["image_name"].tolist()
    assert np.abs(got["pred"] - want["pred"]).max() < 1e-5  # the same bytes, the same model, the same figures
    # predict reads the test store too, and agrees with the folder
    for d, out in ((data, "a.csv"), (sample_dir, "b.csv")):
        assert invoke("predict", "--run", tiny_run, "--data", d, "--workers", 0, "--out", tmp_path / out).exit_code == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert np.abs(a["pred"] - b["pred"]).max() < 1e-6


def test_dataloader_workers_read_the_store_by_id(sample_dir, tmp_path):
    from melafast.data import inference_dl, load_competition

    from melafast.data import store

    data = _as_store(sample_dir, tmp_path / "stored", splits=("train",))
    train, _ = load_competition(data)
    folder, _ = load_competition(sample_dir)
    store._INDEXES.clear()
    dl = inference_dl(train, 32, bs=16, num_workers=2)
    assert len(store._INDEXES) == 1  # indexed in this process, before the workers fork: they share it
    batches = [b[0] for b in dl]  # each worker opens its own descriptor
    plain = [b[0] for b in inference_dl(folder, 32, bs=16, num_workers=0)]
    assert sum(len(b) for b in batches) == 64
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(batches, plain))


def test_store_errors_name_the_id(sample_dir, tmp_path):
    from melafast.data import check_images, load_competition
    from melafast.errors import DataError

    data = _as_store(sample_dir, tmp_path / "stored", splits=("train",))
    table = pd.read_csv(data / "train.csv")
    pd.concat([table, table.tail(1).assign(image_name="ISIC_NOT_THERE")]).to_csv(data / "train.csv", index=False)
    res = invoke("train", "--data", data, "--size", 32, "--epochs", 1, "--no-pretrained", "--out", tmp_path / "r")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "ISIC_NOT_THERE" in res.stderr
    assert "are not in" in res.stderr and "train-image.hdf5" in res.stderr
    table.to_csv(data / "train.csv", index=False)
    with h5py.File(data / "train-image.hdf5", "a") as f:  # a corrupt JPEG inside the store
        name = table["image_name"].iloc[3]
        good = f[name][()].tobytes()
        del f[name]
        f.create_dataset(name, data=np.void(good[: len(good) // 2]))
    train, _ = load_competition(data)
    with pytest.raises(DataError, match=f"{name} \\(truncated JPEG"):
        check_images(train)
    ok, bad = check_images(train, on_bad="skip")
    assert bad["image_name"].tolist() == [name] and len(ok) == 63


def test_prepare_writes_a_resized_store(sample_dir, tmp_path):
    from PIL import Image

    from melafast.data import load_competition
    from melafast.data.store import open_image

    res = invoke("prepare", "--src", sample_dir, "--out", tmp_path / "p", "--size", 40, "--hdf5", "--workers", 1)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "train-image.hdf5").is_file() and (tmp_path / "p" / "test-image.hdf5").is_file()
    train, test = load_competition(tmp_path / "p")
    assert len(train) == 64 and len(test) == 16
    assert Image.open(open_image(train["fname"].iloc[0])).size == (40, 40)


@needs_ham
def test_ham10000_from_a_store_gives_the_folders_figures(tmp_path):
    "Real JPEGs moved into a store: a fixed-seed run scores exactly as from the image folder."
    src = tmp_path / "ham"
    src.mkdir()
    pd.read_csv(HAM / "train.csv").groupby("target").head(40).to_csv(src / "train.csv", index=False)
    data = _as_store(src, tmp_path / "stored", splits=("train",), images=HAM / "images")
    settings = {**TINY, "meta": True}
    runs = {}
    for name, extra in (("folder", {"data": src, "images": HAM / "images"}), ("store", {"data": data})):
        res = invoke(*_cli_args({**settings, **extra, "out": tmp_path / name}))
        assert res.exit_code == 0, res.output
        runs[name] = pd.read_csv(tmp_path / name / "oof.csv")
    assert np.abs(runs["folder"]["pred"] - runs["store"]["pred"]).max() < 1e-5
    shutil.rmtree(tmp_path / "folder")


def test_predict_a_store_of_new_images(tiny_run, sample_dir, tmp_path):
    data = _as_store(sample_dir, tmp_path / "stored", splits=("test",))
    res = invoke("predict", "--run", tiny_run, "--images", data / "test-image.hdf5", "--workers", 0,
                 "--out", tmp_path / "a.csv")
    assert res.exit_code == 0, res.output
    res = invoke("predict", "--run", tiny_run, "--images", sample_dir / "jpeg" / "test", "--workers", 0,
                 "--out", tmp_path / "b.csv")
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert a["image_name"].tolist() == b["image_name"].tolist() and np.abs(a["pred"] - b["pred"]).max() < 1e-6


def test_the_store_index_reads_each_layout_as_h5py_does(tmp_path, monkeypatch):
    """Opaque, fixed-length bytes and uint8 datasets are read from their offsets; chunked, compressed and
    variable-length ones through h5py; either way the bytes h5py gives. A rewritten store is indexed again, and a
    stored index is loaded, not rebuilt."""
    from melafast.data import store as st

    monkeypatch.setenv("MELAFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    blobs = {f"id{i}": rng.integers(0, 256, 50 + i, dtype=np.uint8).tobytes() + b"\xff\xd9" for i in range(6)}
    path = tmp_path / "mixed.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("id0", data=np.void(blobs["id0"]))
        f.create_dataset("id1", data=np.array(blobs["id1"], dtype=f"S{len(blobs['id1'])}"))
        f.create_dataset("id2", data=np.frombuffer(blobs["id2"], dtype=np.uint8))
        f.create_dataset("id3", data=np.frombuffer(blobs["id3"], dtype=np.uint8), chunks=(16,), compression="gzip")
        f.create_dataset("id4", data=blobs["id4"].hex(), dtype=h5py.string_dtype())  # variable-length: via h5py
        f.create_dataset("id5", data=np.frombuffer(blobs["id5"], dtype=np.uint8), chunks=(8,))
    idx = st.store_index(path)
    direct = {k for k in blobs if idx.offsets[idx.position(k)] >= 0}
    assert direct == {"id0", "id1", "id2"}
    for k, want in blobs.items():
        got = st.read_bytes(st.stored_name(path, k))
        assert got == (want.hex().encode() if k == "id4" else want), k
        if k != "id4":
            assert st.file_size(st.stored_name(path, k)) == len(want)
    assert idx.contains(["id1", "id9", "id", "id10"]).tolist() == [True, False, False, False]
    with pytest.raises(Exception, match="has no image 'id9'"):
        st.read_bytes(st.stored_name(path, "id9"))
    # the same path, rewritten: other offsets, read right
    write_store(path, [("id0", b"new bytes of id0"), ("zz", b"\x00\x01")])
    assert st.read_bytes(st.stored_name(path, "id0")) == b"new bytes of id0"
    assert st.store_ids(path) == ["id0", "zz"]
    # another process (the in-memory index dropped) loads the cached index: nothing rebuilt
    st._INDEXES.clear()
    build = st.StoreIndex.__dict__["build"]
    monkeypatch.setattr(st.StoreIndex, "build", classmethod(lambda cls, s: (_ for _ in ()).throw(AssertionError)))
    assert st.read_bytes(st.stored_name(path, "zz")) == b"\x00\x01"
    assert st.store_index(path).nbytes <= 2 * (8 + 8 + 3)
    # two stores read in turn each keep their index (no reload per read); a damaged cached index is rebuilt
    other = tmp_path / "other.hdf5"
    write_store(other, [("o1", b"other bytes")])
    monkeypatch.setattr(st.StoreIndex, "build", build)
    for _ in range(3):
        assert st.read_bytes(st.stored_name(other, "o1")) == b"other bytes"
        assert st.read_bytes(st.stored_name(path, "zz")) == b"\x00\x01"
    assert {k[0] for k in st._INDEXES} >= {str(path), str(other)}
    damaged = sorted((tmp_path / "cache" / "store-index").glob("*.npz"))
    assert len(damaged) >= 2
    for f in damaged:
        f.write_bytes(b"PK\x03\x04 damaged")
    st._INDEXES.clear()
    assert st.read_bytes(st.stored_name(other, "o1")) == b"other bytes"
