"""What drawing negatives per epoch (`--neg-per-pos K`) costs in AUC and saves in time, on HAM10000.

For each seed, one lesion-grouped, stratified sample of --images HAM10000 images (its melanomas at their share, about
11%) trains `tf_efficientnet_lite0` with every K of --k (and with every negative, "all"), the same folds and
settings otherwise. Read from each run folder:

  oof        the out-of-fold AUC (every row scored, whatever K)
  epoch_s    the mean wall time of an unfrozen epoch (metrics.csv: training plus validation)
  train_s    the whole `melafast train` call

Reports mean ± sample sd over seeds and writes a Markdown table and a JSON file.

    python benchmarks/neg_per_pos.py --images 2000 --size 64 --seeds 3 --k 1 3 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _emit import mean_sd, write_table

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"
LITE0 = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 10])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "neg_per_pos")
    a = p.parse_args(argv)
    if not HAM.is_dir():
        sys.exit(f"{HAM} is needed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cross_site import sample

    work = a.work or Path(tempfile.mkdtemp(prefix="neg_per_pos-"))
    table = pd.read_csv(HAM / "train.csv")
    rows = []
    for seed in range(a.seeds):
        data = work / f"data-{seed}"
        data.mkdir(parents=True, exist_ok=True)
        sample(table, a.images, seed).to_csv(data / "train.csv", index=False)
        for k in [*a.k, None]:
            out = work / f"run-s{seed}-k{k or 'all'}"
            t0 = time.time()
            cmd = [sys.executable, "-m", "melafast", "train", "--data", str(data), "--images", str(HAM / "images"),
                   "--arch", "tf_efficientnet_lite0", *(["--weights", str(LITE0)] if LITE0.is_file() else
                                                        ["--no-pretrained"]),
                   "--size", str(a.size), "--bs", str(a.bs), "--folds", str(a.folds), "--freeze-epochs", "1",
                   "--epochs", str(a.epochs), "--lr", a.lr, "--tta", "1", "--seed", str(seed), "--out", str(out),
                   *(["--neg-per-pos", str(k)] if k else [])]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            metrics = pd.read_csv(out / "metrics.csv")
            row = dict(seed=seed, k=k or "all", oof=json.loads((out / "results.json").read_text())["oof_auc"],
                       epoch_s=float(metrics.loc[metrics["phase"] == "unfrozen", "seconds"].mean()),
                       train_s=round(time.time() - t0, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    lines = ["| negatives per epoch | seeds | OOF AUC | unfrozen epoch (s) | whole run (s) |", "|---|---|---|---|---|"]
    for k, part in df.groupby("k", sort=False):
        lines.append(f"| {'K = ' + str(k) if k != 'all' else 'all'} | {len(part)} | {mean_sd(part['oof'])} | "
                     f"{mean_sd(part['epoch_s'], 1)} | {part['train_s'].mean():.0f} |")
    write_table(a.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
