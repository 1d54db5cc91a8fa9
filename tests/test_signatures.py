"""What melafast reads from pixels: perceptual hashes (near-duplicates, kept in one fold, flagged in evaluations) and
skin tone (ITA), each checked against an independent computation or a known answer."""

import numpy as np
import pandas as pd
import pytest
from conftest import invoke


def _srgb(lab):
    "CIELAB -> sRGB uint8, D65, written out from the CIE formulas (not melafast's code)."
    L, a, b = lab
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    d = 6 / 29
    xyz = [f ** 3 if f > d else 3 * d * d * (f - 4 / 29) for f in (fx, fy, fz)]
    xyz = np.array(xyz) * np.array([0.95047, 1.0, 1.08883])
    m = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                  [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(m @ xyz, 0, 1)
    rgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.round(rgb * 255).astype(np.uint8)


def _lesion_image(lab, size=96, seed=0):
    "Skin of the colour `lab` with a dark lesion in the middle, a few hairs, black vignette corners and noise."
    rng = np.random.default_rng(seed)
    img = np.tile(_srgb(lab).astype(np.float64), (size, size, 1))
    y, x = np.mgrid[:size, :size]
    lesion = ((x - size / 2) / (size * 0.3)) ** 2 + ((y - size / 2) / (size * 0.22)) ** 2 < 1
    img[lesion] = [70, 45, 35]
    for _ in range(4):  # hairs
        r = rng.integers(0, size)
        img[r, :] = [30, 25, 20]
    corner = ((x - size / 2) ** 2 + (y - size / 2) ** 2) > (size * 0.68) ** 2
    img[corner] = 5
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("lab,band", [((78, 6, 12), "very light"), ((66, 8, 17), "light"),
                                      ((60, 9, 16), "intermediate"), ((55, 10, 18), "tan"),
                                      ((45, 12, 20), "brown"), ((30, 10, 15), "dark")])
def test_ita_of_skin_of_known_colour(lab, band):
    from melafast.data.signatures import ita, ita_band

    want = np.degrees(np.arctan((lab[0] - 50) / lab[2]))
    got = ita(_lesion_image(lab))
    assert abs(got - want) < 2.0, (got, want)
    assert ita_band([got])[0] == band and ita_band([want])[0] == band


def test_hamming_and_near_duplicates_match_brute_force():
    from melafast.data.signatures import duplicate_groups, hamming, near_duplicates

    rng = np.random.default_rng(0)
    hashes = []
    for _ in range(40):  # 256-bit hashes, each with a few copies that flip 0 to 30 bits
        h = int.from_bytes(rng.bytes(32), "big")
        hashes.append(h)
        for flips in rng.integers(0, 31, 2):
            hashes.append(h ^ int(sum(1 << int(b) for b in rng.choice(256, flips, replace=False))))
    hexes = [f"{h:064x}" for h in hashes]
    for d in (0, 6, 24, 31):
        brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                 if bin(hashes[i] ^ hashes[j]).count("1") <= d}
        got = near_duplicates(hexes, d)
        assert set(zip(got["i"], got["j"])) == brute
        assert all(bin(hashes[i] ^ hashes[j]).count("1") == k for i, j, k in got.itertuples(index=False))
    arr = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hexes])
    assert hamming(arr[:1], arr).tolist() == [bin(hashes[0] ^ h).count("1") for h in hashes]
    groups = duplicate_groups(4, pd.DataFrame({"i": [0, 1], "j": [1, 2], "distance": [1, 1]}))
    assert groups[0] == groups[1] == groups[2] != groups[3]


def _copies(sample_dir, tmp_path, n=4):
    "A dataset of `n` training images of the sample resized to 80% under new names, and of other drawn lesions."
    import shutil

    from PIL import Image

    train = pd.read_csv(sample_dir / "train.csv")
    d = tmp_path / "copies"
    (d / "jpeg" / "train").mkdir(parents=True)
    rows = []
    for r in train.head(n).itertuples():
        im = Image.open(sample_dir / "jpeg" / "train" / f"{r.image_name}.jpg")
        im.resize((int(im.width * 0.8), int(im.height * 0.8))).save(d / "jpeg" / "train" / f"COPY_{r.image_name}.jpg")
        rows.append(dict(image_name=f"COPY_{r.image_name}", patient_id=f"NEW_{r.patient_id}", target=r.target))
    from conftest import without_lookalikes

    from melafast.data import make_sample

    other = make_sample(tmp_path / "other", n_train=20, n_test=1, seed=11, px=64)
    others = without_lookalikes(pd.read_csv(other / "train.csv"), other / "jpeg" / "train", sample_dir).head(6)
    assert len(others) == 6
    for r in others.itertuples():  # other drawn lesions, none a look-alike of a sample image
        shutil.copy(other / "jpeg" / "train" / f"{r.image_name}.jpg", d / "jpeg" / "train" / f"X_{r.image_name}.jpg")
        rows.append(dict(image_name=f"X_{r.image_name}", patient_id=f"X_{r.patient_id}", target=r.target))
    pd.DataFrame(rows).to_csv(d / "train.csv", index=False)
    return d, train


def test_dedup_command_lists_copies_across_datasets(sample_dir, tmp_path):
    copies, train = _copies(sample_dir, tmp_path)
    out = tmp_path / "dups.csv"
    res = invoke("dedup", sample_dir, copies, "--out", out, "--workers", 1)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    for name in train["image_name"].head(4):  # each copy sits in its original's group
        g = table.loc[table["image_name"] == f"COPY_{name}", "group"]
        assert len(g) == 1 and name in set(table.loc[table["group"] == g.iloc[0], "image_name"])
    assert "span two datasets" in res.output
    res = invoke("dedup", sample_dir, "--distance", 40)
    assert res.exit_code == 1 and "--distance must be between 0 and 31" in res.stderr


def test_training_keeps_near_duplicates_in_one_fold_and_drops_external_copies(sample_dir, tmp_path):
    from melafast.config import TrainConfig
    from melafast.train.table import build_table

    import shutil

    copies, train = _copies(sample_dir, tmp_path)
    # a main table holding, beside the sample, resized copies of 3 of its images under new names and patients
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    extra = pd.read_csv(copies / "train.csv").head(3)
    for name in extra["image_name"]:
        shutil.copy(copies / "jpeg" / "train" / f"{name}.jpg", data / "jpeg" / "train")
    pd.concat([train, extra]).to_csv(data / "train.csv", index=False)
    said = []
    cfg = TrainConfig(data=str(data), external=[str(copies)], folds=2, workers=0, seed=0)
    df = build_table(cfg, log=said.append).df
    dropped = [s for s in said if "near-duplicates of main-table images" in s]
    assert len(dropped) == 1 and dropped[0].startswith(f"external data {copies}: 1 images")  # COPY_ 3 is new there
    assert df["image_name"].str.startswith("X_").sum() == 6
    main = df[df["fold"] >= 0].set_index("image_name")
    for name in train["image_name"].head(3):  # each copy validated with its original
        assert main.loc[f"COPY_{name}", "fold"] == main.loc[name, "fold"]
        assert main.loc[f"COPY_{name}", "dup_cluster"] == main.loc[name, "dup_cluster"]
    assert any(s.startswith("near-duplicates: ") for s in said)
    off = build_table(TrainConfig(data=str(sample_dir), external=[str(copies)], folds=2, workers=0, seed=0, dedup=-1),
                      log=lambda m: None).df
    assert off["image_name"].str.startswith("COPY_").sum() == 4  # --dedup -1: nothing dropped
