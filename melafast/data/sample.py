"""The synthetic sample: drawn lesions whose label depends on the picture and the metadata, to try melafast anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["make_sample", "make_sample_2024"]

_SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital"]
_SITE_P = [0.5, 0.25, 0.15, 0.06, 0.025, 0.015]
_SITE_RISK = {"torso": 0.4, "head/neck": 0.6, "lower extremity": -0.2, "upper extremity": -0.2,
              "palms/soles": -0.5, "oral/genital": 0.0}


def _lesion_image(rng: np.random.Generator, m: float, px: int) -> np.ndarray:
    "A skin-coloured square with one lesion; malignancy score `m` makes it larger, darker, irregular, variegated."
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px - 0.5
    skin = np.array([225, 175, 145], np.float32) * rng.uniform(0.85, 1.05) + rng.normal(0, 6, 3)
    img = skin + 12 * (xx + yy)[..., None] * rng.normal(1, 0.3) + rng.normal(0, 5, (px, px, 3))
    cy, cx = rng.normal(0, 0.05, 2)
    ang, theta = np.arctan2(yy - cy, xx - cx), rng.uniform(0, np.pi)
    r = np.hypot(yy - cy, xx - cx)
    s = 1 / (1 + np.exp(-m))  # 0..1 malignancy
    base = rng.uniform(0.12, 0.18) + 0.14 * s
    elong = 1 + rng.uniform(0, 0.25) + 0.35 * s * rng.random()
    border = sum(rng.normal(0, 0.02 + 0.09 * s) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in range(2, 7))
    radius = base * (1 + border) / np.sqrt(np.cos(ang - theta) ** 2 + (elong * np.sin(ang - theta)) ** 2)
    inside = np.clip((radius - r) / 0.015, 0, 1)[..., None]
    brown = np.array([150, 95, 60], np.float32) * (1 - 0.55 * s) + rng.normal(0, 8, 3)
    lesion = brown + rng.normal(0, 4, (px, px, 3))
    n_blots = rng.poisson(4 * s ** 2)
    for _ in range(n_blots):  # blue-grey and black areas appear in malignant-looking lesions
        by, bx = rng.normal(cy, base / 2), rng.normal(cx, base / 2)
        blot = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (base / 4) ** 2))[..., None]
        lesion = lesion * (1 - 0.8 * blot) + 0.8 * blot * np.array(rng.choice([[40, 40, 60], [90, 100, 130], [25, 20, 20]]))
    img = img * (1 - inside) + lesion * inside
    return np.clip(img, 0, 255).astype(np.uint8)


def make_sample(dest, n_train: int = 240, n_test: int = 60, seed: int = 0, px: int = 96) -> Path:
    """Write a small **synthetic** dataset in the Kaggle layout to `dest` and return its path.

    `train.csv`, `test.csv`, `sample_submission.csv`, `jpeg/train`, `jpeg/test`. The label depends on both the
    picture (lesion size, darkness, border, colours) and the metadata (age, site, sex), so a model learns from
    each. Image names start with `SYNTH_`; these are not real lesions.
    """
    from PIL import Image

    dest = Path(dest)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    n_patients = max(2, int(n * 0.45))
    patient = rng.integers(0, n_patients, n)
    p_sex = rng.choice(["male", "female"], n_patients)
    p_age = np.clip(np.round(rng.normal(50, 15, n_patients) / 5) * 5, 15, 90)
    p_risk = rng.normal(0, 0.6, n_patients)  # some patients carry more risk: images of one patient correlate
    sex = np.where(rng.random(n) < 0.05, "", p_sex[patient]).astype(object)
    age = np.where(rng.random(n) < 0.05, np.nan, p_age[patient])
    site = np.where(rng.random(n) < 0.05, "", rng.choice(_SITES, n, p=_SITE_P)).astype(object)
    m = rng.normal(0, 1, n) + p_risk[patient]
    meta_z = np.nan_to_num((age - 50) / 15) + np.array([_SITE_RISK.get(s, 0.0) for s in site]) + 0.3 * (sex == "male")
    logit = 2.2 * m + 1.4 * meta_z - 1.6
    target = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    names = [f"SYNTH_{i:06d}" for i in range(n)]
    df = pd.DataFrame({"image_name": names, "patient_id": [f"SYNTH_P{p:05d}" for p in patient], "sex": sex,
                       "age_approx": age, "anatom_site_general_challenge": site, "target": target})
    for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
        folder = dest / "jpeg" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n)[part]:
            Image.fromarray(_lesion_image(rng, m[i], px)).save(folder / f"{names[i]}.jpg", quality=90)
    df.iloc[:n_train].to_csv(dest / "train.csv", index=False)
    df.iloc[n_train:].drop(columns="target").to_csv(dest / "test.csv", index=False)
    pd.DataFrame({"image_name": names[n_train:], "target": 0.0}).to_csv(dest / "sample_submission.csv", index=False)
    (dest / "README.txt").write_text(
        f"SYNTHETIC melanoma sample made by melafast.make_sample(seed={seed}): {n_train} train and {n_test} test\n"
        "images of drawn lesions, not real patients. For trying melafast out; scores on it mean nothing clinically.\n")
    return dest


def make_sample_2024(dest, n_train: int = 400, n_test: int = 40, seed: int = 0, px: int = 64,
                     malignant: float = 0.04) -> Path:
    """Write a small **synthetic** dataset in the ISIC 2024 (SLICE-3D) layout to `dest` and return its path.

    `train-metadata.csv` and `test-metadata.csv` keyed by `isic_id`, with several lesions per patient and the 2024
    columns melafast reads: `age_approx`, `sex`, `anatom_site_general`, `clin_size_long_diam_mm` and a handful of
    `tbp_lv_*` measurements (size, border, colour, symmetry), plus the columns that exist in train only (`lesion_id`,
    `iddx_full`, `iddx_1`, `mel_thick_mm`, `tbp_lv_dnn_lesion_confidence`); `train-image.hdf5` and
    `test-image.hdf5` with each image's JPEG bytes under its id; `sample_submission.csv` (`isic_id,target`). About
    `malignant` of the lesions are malignant (the real set: under 0.1%; a sample needs a few per fold). Lesions that
    stand out among their patient's are likelier malignant ("ugly ducklings"). Not real patients.
    """
    import io

    from PIL import Image

    from .store import write_store

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    n_patients = max(2, n // 8)
    patient = np.sort(rng.integers(0, n_patients, n))  # a patient's lesions together: train and test patients apart
    p_age = np.clip(np.round(rng.normal(55, 14, n_patients) / 5) * 5, 20, 85)
    p_sex = rng.choice(["male", "female"], n_patients)
    p_size = rng.normal(4.0, 0.8, n_patients)  # each patient's typical lesion size
    odd = rng.normal(0, 1, n)  # how far a lesion stands out among its patient's
    size = np.clip(p_size[patient] + 0.9 * odd + rng.normal(0, 0.4, n), 1.0, None)
    m = 1.2 * odd + rng.normal(0, 0.8, n)
    cut = np.quantile(m, 1 - malignant)
    target = (m >= cut).astype(int)
    site = rng.choice(["posterior torso", "anterior torso", "lower extremity", "upper extremity", "head/neck"], n)
    ids = [f"ISIC_{9000000 + i:07d}" for i in range(n)]
    df = pd.DataFrame({
        "isic_id": ids, "target": target, "patient_id": [f"IP_{p:07d}" for p in patient],
        "age_approx": p_age[patient], "sex": p_sex[patient], "anatom_site_general": site,
        "clin_size_long_diam_mm": np.round(size, 2),
        "image_type": "TBP tile: close-up", "tbp_tile_type": "3D: XP",
        "tbp_lv_areaMM2": np.round(np.pi * (size / 2) ** 2 * rng.uniform(0.7, 1.0, n), 2),
        "tbp_lv_perimeterMM": np.round(np.pi * size * rng.uniform(1.0, 1.3, n) + 0.3 * np.clip(m, 0, None), 2),
        "tbp_lv_norm_border": np.round(np.clip(3 + 1.5 * m + rng.normal(0, 1, n), 0, 10), 3),
        "tbp_lv_color_std_mean": np.round(np.clip(1.5 + 0.6 * m + rng.normal(0, 0.5, n), 0, None), 3),
        "tbp_lv_symm_2axis": np.round(np.clip(0.3 + 0.1 * m + rng.normal(0, 0.1, n), 0, 1), 3),
        "tbp_lv_deltaLBnorm": np.round(7 + 1.2 * m + rng.normal(0, 1.5, n), 3),
        "tbp_lv_nevi_confidence": np.round(np.clip(80 - 15 * m + rng.normal(0, 10, n), 0, 100), 2),
        "attribution": "melafast synthetic sample", "copyright_license": "CC-0",
        "lesion_id": np.where(target == 1, [f"IL_{i:07d}" for i in range(n)], None),
        "iddx_full": np.where(target == 1, "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma",
                              "Benign"),
        "iddx_1": np.where(target == 1, "Malignant", "Benign"),
        "mel_thick_mm": np.where(target == 1, np.round(rng.uniform(0.2, 1.5, n), 2), np.nan),
        "tbp_lv_dnn_lesion_confidence": np.round(np.clip(90 + 5 * rng.normal(0, 1, n), 0, 100), 2),
    })
    train_rows = np.arange(n) < n_train
    for split, rows in (("train", train_rows), ("test", ~train_rows)):
        def images(rows=rows):
            for i in np.flatnonzero(rows):
                buf = io.BytesIO()
                Image.fromarray(_lesion_image(rng, m[i] + 0.5, px)).save(buf, "JPEG", quality=90)
                yield ids[i], buf.getvalue()

        write_store(dest / f"{split}-image.hdf5", images())
    only_train = ["target", "lesion_id", "iddx_full", "iddx_1", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence"]
    df[train_rows].to_csv(dest / "train-metadata.csv", index=False)
    df[~train_rows].drop(columns=only_train).to_csv(dest / "test-metadata.csv", index=False)
    pd.DataFrame({"isic_id": df.loc[~train_rows, "isic_id"], "target": 0.3}).to_csv(dest / "sample_submission.csv",
                                                                                     index=False)
    (dest / "README.txt").write_text(
        f"SYNTHETIC sample in the ISIC 2024 layout made by melafast (seed={seed}): {n_train} train and {n_test} test\n"
        "lesion crops, drawn, not real patients. For trying the 2024 path out; scores on it mean nothing clinically.\n")
    return dest
