"""How far the in-clinic CV overstates a clinic the run never saw: HAM10000's Vienna sources train, the Queensland
practice (`rosendahl`) is scored, each with and without metadata, with and without Shades of Gray colour constancy.

For each seed and each --constancy value, one `melafast train` on a stratified sample of --train images of the Vienna
sources (vidir_modern, vidir_molemax, vienna_dias; lesion-grouped folds), then one `melafast evaluate` on a sample
of --external images of the Queensland practice. Read from the run folder and evaluation.json:

  oof            the run's out-of-fold AUC (in-clinic CV; what `train` prints)
  oof_no_meta    the same rows with every patient field blanked
  site           the fold ensemble's AUC on the Queensland images, with their metadata (predict's answer)
  site_no_meta   the same images with every field blanked (the image path)
  gap            oof - site: how far the CV overstates the new clinic
  meta_cost      site - site_no_meta: what the metadata adds (negative: costs) at the new clinic

Reports mean ± sample sd over seeds per --constancy value and writes a Markdown table and a JSON file. The data is
`../shared/data/ham10000` (with sources.csv); nothing of it is written into the repository: the dataset folders are
made of CSVs in a temporary folder and point at the images with --images.

    python benchmarks/cross_site.py --train 2000 --external 1200 --size 64 --seeds 3 --constancy 0 6
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
NEW_CLINIC = "rosendahl"
FIGURES = ("oof", "oof_no_meta", "site", "site_no_meta", "gap", "meta_cost")


def sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    "`n` rows (all when n >= len), stratified by target, whole lesions (patient_id) kept together."
    if n >= len(df):
        return df
    lesions = df.groupby("patient_id")["target"].max().reset_index()
    share = n / len(df)
    keep = lesions.groupby("target", group_keys=False).apply(lambda g: g.sample(frac=share, random_state=seed))
    return df[df["patient_id"].isin(keep["patient_id"])]


def datasets(work: Path, n_train: int, n_ext: int, seed: int) -> tuple[Path, Path]:
    table = pd.read_csv(HAM / "train.csv").merge(pd.read_csv(HAM / "sources.csv"), on="image_name")
    vienna, site = table[table["attribution"] != NEW_CLINIC], table[table["attribution"] == NEW_CLINIC]
    out = []
    for name, part, n in (("vienna", vienna, n_train), ("queensland", site, n_ext)):
        folder = work / f"{name}-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        sample(part, n, seed).to_csv(folder / "train.csv", index=False)
        out.append(folder)
    return out[0], out[1]


def run(cmd: list) -> str:
    "`melafast CMD...` with this interpreter (so PYTHONPATH chooses the melafast that runs)."
    res = subprocess.run([sys.executable, "-m", "melafast", *(str(c) for c in cmd[1:])], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def one(a, work: Path, seed: int, constancy: int) -> dict:
    train_dir, ext_dir = datasets(work, a.train, a.external, seed)
    out = work / f"run-s{seed}-cc{constancy}"
    t0 = time.time()
    run(["melafast", "train", "--data", train_dir, "--images", HAM / "images", "--arch", a.arch,
         *(["--weights", LITE0] if a.arch == "tf_efficientnet_lite0" and LITE0.is_file() else ["--no-pretrained"]),
         "--size", a.size, "--bs", a.bs, "--folds", a.folds, "--freeze-epochs", 1, "--epochs", a.epochs,
         "--lr", a.lr, "--tta", a.tta, "--seed", seed, "--color-constancy", constancy, "--out", out])
    t1 = time.time()
    run(["melafast", "evaluate", "--run", out, "--data", ext_dir, "--images", HAM / "images", "--errors", 0,
         "--bootstrap", a.bootstrap, "--name", "queensland"])
    results = json.loads((out / "results.json").read_text())
    ev = json.loads((out / "evaluations" / "queensland" / "evaluation.json").read_text())
    site, blank = ev["external"]["headline"]["auc"]["value"], ev["no_meta"]["headline"]["auc"]["value"]
    row = dict(seed=seed, constancy=constancy, oof=results["oof_auc"], oof_no_meta=results["oof_auc_no_meta"],
               site=site, site_no_meta=blank, gap=results["oof_auc"] - site, meta_cost=site - blank,
               train_images=int(pd.read_csv(train_dir / "train.csv").shape[0]),
               site_images=ev["external"]["images"], site_melanomas=ev["external"]["melanomas"],
               train_s=round(t1 - t0, 1), evaluate_s=round(time.time() - t1, 1))
    print(json.dumps(row), flush=True)
    return row


def table(rows: pd.DataFrame) -> str:
    lines = ["| colour constancy | seeds | " + " | ".join(FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for cc, part in rows.groupby("constancy"):
        cells = [mean_sd(part[f]) for f in FIGURES]
        lines.append(f"| {'Shades of Gray p=' + str(cc) if cc else 'off'} | {len(part)} | " + " | ".join(cells) + " |")
    if rows["constancy"].nunique() > 1:  # paired by seed: constancy minus off
        base = rows[rows["constancy"] == 0].set_index("seed")
        for cc, part in rows[rows["constancy"] != 0].groupby("constancy"):
            d = part.set_index("seed")[list(FIGURES)] - base[list(FIGURES)]
            d = d.dropna()
            lines.append(f"| p={cc} minus off (paired by seed) | {len(d)} | "
                         + " | ".join(mean_sd(d[f], sign="+") for f in FIGURES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=2000, help="Vienna images that train (a lesion-grouped sample)")
    p.add_argument("--external", type=int, default=1200, help="Queensland images scored")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--tta", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--constancy", type=int, nargs="+", default=[0, 6], help="--color-constancy values to compare")
    p.add_argument("--work", type=Path, default=None, help="Folder for the runs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "cross_site",
                   help="Where the Markdown table and the JSON rows go (.md, .json)")
    a = p.parse_args(argv)
    if not (HAM / "sources.csv").is_file():
        sys.exit(f"{HAM} with sources.csv is needed")
    work = a.work or Path(tempfile.mkdtemp(prefix="cross_site-"))
    rows = [one(a, work, seed, cc) for seed in range(a.seeds) for cc in a.constancy]
    rows = pd.DataFrame(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    write_table(a.out, table(rows).split("\n"), dict(settings=settings, rows=rows.to_dict("records")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
