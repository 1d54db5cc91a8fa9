"""Time `load_competition` + `make_folds` on a competition-sized table (33,126 rows), existence check included.

Uses the real SIIM-ISIC 2020 train.csv from ../shared/data/isic2020_meta when present (else a synthetic table of
the same size), with one empty placeholder file per image so the image-folder scan is real. Prints JSON.

    python benchmarks/data_speed.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2020_meta" / "train.csv"


def _table(n=33_126) -> tuple[pd.DataFrame, str]:
    if REAL.is_file():
        return pd.read_csv(REAL), "real isic2020 train.csv"
    rng = np.random.default_rng(0)
    return pd.DataFrame({"image_name": [f"ISIC_{i:07d}" for i in range(n)],
                         "patient_id": [f"IP_{p:07d}" for p in rng.integers(0, 2056, n)],
                         "sex": rng.choice(["male", "female", ""], n), "age_approx": rng.choice([30.0, 45.0, np.nan], n),
                         "anatom_site_general_challenge": rng.choice(["torso", "head/neck", ""], n),
                         "target": (rng.random(n) < 0.0176).astype(int)}), "synthetic table"


def main():
    from melafast.data import load_competition, make_folds

    df, source = _table()
    tmp = Path(tempfile.mkdtemp())
    try:
        df.to_csv(tmp / "train.csv", index=False)
        img = tmp / "jpeg" / "train"
        img.mkdir(parents=True)
        for name in df["image_name"]:
            (img / f"{name}.jpg").touch()
        os.sync()
        t0 = time.perf_counter()
        train, _ = load_competition(tmp)
        t1 = time.perf_counter()
        folds = make_folds(train, n_folds=5, seed=42)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(tmp)
    res = dict(source=source, rows=len(folds), load_competition_s=round(t1 - t0, 3), make_folds_s=round(t2 - t1, 3),
               total_s=round(t2 - t0, 3), cpu_cores=os.cpu_count())
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
