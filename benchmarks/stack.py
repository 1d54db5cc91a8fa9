"""Does `melafast stack` ever rank worse than the image score it is given? HAM10000 and the ISIC 2024 sample.

HAM10000, for each seed: one lesion-grouped, stratified sample of --images images (cross_site.sample) trains
`tf_efficientnet_lite0` twice, the same folds and settings otherwise: with the metadata fused into the image model
(the default) and without it (--no-meta). Each run is then stacked with every --models learner on sex, site and age:
on the fused run the table holds nothing the image score lacks; on the image-only run it holds what the model never
saw.

The ISIC 2024 sample (`melafast sample --format isic2024`, synthetic, seed N) trains the smallest timm net with its
measurements fused and without them; each is stacked on the measurements with --patient-features.

Per run and learner, from stack.json:
  image    the OOF AUC of the run's image score as it is (pooled over the fold models)
  scaled   the same scores standardised per fold model (what the stack starts from)
  alone    the learner's own model with weight 1 (no guard)
  stack    the stack (weights chosen on inner folds)
  diff     stack - image, and its smallest value over the seeds (the issue's bar: >= -0.005 on every seed)

    python benchmarks/stack.py --seeds 3 --work WORK            # HAM10000 (about 25 min on 2 CPU cores) + 2024
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import pandas as pd
from _emit import mean_sd, write_table

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"
LITE0 = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
HAM_COLUMNS = ["--cat", "sex", "--cat", "anatom_site_general_challenge", "--cont", "age_approx"]
COLUMNS_2024 = ["--cat", "sex", "--cont", "age_approx", "--cont", "clin_size_long_diam_mm", "--cont",
                "tbp_lv_norm_border", "--cont", "tbp_lv_color_std_mean", "--patient-features"]
PACKAGES = dict(lightgbm="lightgbm", xgboost="xgboost", catboost="catboost")


def _train(cmd: list, out: Path, run) -> float:
    "Train unless `out` already holds a finished run of this command (--work reuse); the seconds it took."
    if (out / "results.json").is_file():
        return float("nan")
    t0 = time.time()
    run(["melafast", "train", *cmd, "--out", out])
    return time.time() - t0


def _stack(run_dir: Path, columns: list, model: str, run) -> dict:
    t0 = time.time()
    run(["melafast", "stack", "--run", run_dir, *columns, "--model", model, "--bootstrap", 1000])
    s = json.loads((run_dir / "stack.json").read_text())
    auc = next(c for c in s["comparison"] if c["metric"] == "AUC")
    return dict(image=s["image_auc"], scaled=s["image_scaled_auc"], alone=s["model_auc"], stack=s["stack_auc"],
                diff=s["stack_auc"] - s["image_auc"], lo=auc["lo"], hi=auc["hi"], verdict=s["verdict"],
                weights=[f["weight"] for f in s["folds"]], rounds=[f["rounds"] for f in s["folds"]],
                stack_s=round(time.time() - t0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-2024", type=int, default=1500, help="training lesions of each 2024 sample (0: skip it)")
    p.add_argument("--models", nargs="+", default=["trees", "logistic", "lightgbm", "xgboost", "catboost"])
    p.add_argument("--work", type=Path, default=None, help="keeps the runs; finished ones are stacked, not retrained")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "stack")
    a = p.parse_args(argv)
    if not HAM.is_dir():
        sys.exit(f"{HAM} is needed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tempfile

    from cross_site import run, sample

    models = [m for m in a.models if m not in PACKAGES or importlib.util.find_spec(PACKAGES[m])]
    if models != a.models:
        print(f"left out (not installed): {', '.join(sorted(set(a.models) - set(models)))}", flush=True)
    work = a.work or Path(tempfile.mkdtemp(prefix="stack-"))
    table = pd.read_csv(HAM / "train.csv")
    rows = []
    for seed in range(a.seeds):
        data = work / f"ham-{seed}"
        data.mkdir(parents=True, exist_ok=True)
        sample(table, a.images, seed).to_csv(data / "train.csv", index=False)
        for kind, extra in (("HAM10000, metadata fused", []), ("HAM10000, image only", ["--no-meta"])):
            out = work / f"run-s{seed}-{'image' if extra else 'fused'}"
            secs = _train(["--data", data, "--images", HAM / "images", "--arch", "tf_efficientnet_lite0",
                           *(["--weights", LITE0] if LITE0.is_file() else ["--no-pretrained"]), "--size", a.size,
                           "--bs", 32, "--folds", a.folds, "--freeze-epochs", 1, "--epochs", a.epochs, "--lr", "1e-3",
                           "--tta", 1, "--seed", seed, *extra], out, run)
            for m in models:
                row = dict(data=kind, seed=seed, model=m, train_s=secs, **_stack(out, HAM_COLUMNS, m, run))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if a.n_2024:
            data = work / f"isic2024-{seed}"
            if not (data / "train-metadata.csv").is_file():
                run(["melafast", "sample", "--format", "isic2024", "--out", data, "--n-train", a.n_2024, "--n-test",
                     50, "--seed", seed + 1])
            for kind, extra in (("ISIC 2024 sample, metadata fused", [c for c in COLUMNS_2024 if c != "--patient-features"]),
                                ("ISIC 2024 sample, image only", ["--no-meta"])):
                out = work / f"run2024-s{seed}" if extra == ["--no-meta"] else work / f"run2024-s{seed}-fused"
                secs = _train(["--data", data, "--arch", "mobilenetv3_small_050", "--no-pretrained", "--size", 32,
                               "--bs", 32, "--folds", a.folds, "--freeze-epochs", 1, "--epochs", 2, "--lr", "1e-2",
                               "--tta", 1, "--seed", seed, "--workers", 0, *extra], out, run)
                for m in models:
                    row = dict(data=kind, seed=seed, model=m, train_s=secs, **_stack(out, COLUMNS_2024, m, run))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    lines = ["| data, run | stack model | seeds | image score | scaled per fold model | model alone | stack | "
             "stack - image (worst seed) | table's weight per fold | verdicts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, m), part in df.groupby(["data", "model"], sort=False):
        w = [x for ws in part["weights"] for x in ws]
        lines.append(f"| {kind} | {m} | {len(part)} | {mean_sd(part['image'])} | {mean_sd(part['scaled'])} | "
                     f"{mean_sd(part['alone'])} | {mean_sd(part['stack'])} | {mean_sd(part['diff'], sign='+')} "
                     f"({part['diff'].min():+.3f}) | {sum(w) / len(w):.2f} (0 in {sum(x == 0 for x in w)} of "
                     f"{len(w)}) | {', '.join(f'{v} {n}' for v, n in part['verdict'].value_counts().items())} |")
    write_table(a.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
