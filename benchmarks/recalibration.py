"""Do recalibrated probabilities mean what they say? Expected calibration error (ECE, 10 bins) before and after
`melafast recalibrate`, on HAM10000 images no run trained on, for the runs `benchmarks/cross_site.py` made (one per
seed, colour constancy off).

For each run: a lesion-grouped sample of --held-out Vienna images outside its training table (the clinic it trained
in), split by lesion into a calibration half and a test half, is scored as predict scores (the fold mean). On the
test half:
  raw        ECE of predict's probability
  oof_fit    ECE after the recalibration fitted on the run's out-of-fold rows (`melafast recalibrate --run R`)
  cal_fit    ECE after the recalibration fitted on the calibration half (`melafast recalibrate --run R --data CAL`)
  auc_raw, auc_after  the ROC AUC before and after (a monotone map: equal)
and on the Queensland images `cross_site.py` scored (another clinic): site_raw and site_oof_fit.

    python benchmarks/recalibration.py --work /tmp/cs_work --held-out 1200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from _emit import mean_sd, write_table

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"
FIGURES = ("raw", "oof_fit", "cal_fit", "auc_raw", "auc_after", "site_raw", "site_oof_fit")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="cross_site.py's --work folder")
    p.add_argument("--held-out", type=int, default=1200)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "recalibration")
    a = p.parse_args(argv)
    from melafast.evaluate.external import score_rows
    from melafast.evaluate.recalibrate import fit_recalibration
    from melafast.data import load_split
    from melafast.metrics import auc, calibration
    from melafast.record import Recalibration
    from melafast.runfolder import RunFolder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cross_site import NEW_CLINIC, sample

    table = pd.read_csv(HAM / "train.csv").merge(pd.read_csv(HAM / "sources.csv"), on="image_name")
    rows = []
    for run in sorted(a.work.glob("run-s*-cc0")):
        seed = int(run.name.split("-s")[1].split("-")[0])
        folder = RunFolder(run)
        trained = set(pd.read_csv(a.work / f"vienna-{seed}" / "train.csv")["patient_id"])
        vienna = table[(table["attribution"] != NEW_CLINIC) & ~table["patient_id"].isin(trained)]
        held = sample(vienna, a.held_out, seed + 100)
        data = a.work / f"held-{seed}"
        data.mkdir(exist_ok=True)
        held.to_csv(data / "train.csv", index=False)
        held = load_split(data, "train", images=HAM / "images").reset_index(drop=True)
        scores = score_rows(folder, held, None, 64, None, None, None, False, lambda m: None)
        lesions = held["patient_id"].drop_duplicates().sample(frac=0.5, random_state=seed)
        cal = held["patient_id"].isin(lesions).to_numpy()
        y, pr = scores["target"].to_numpy(), scores["pred"].to_numpy()
        oof = folder.oof()
        by_oof = Recalibration(*fit_recalibration(oof["target"], oof["pred"]))
        by_cal = Recalibration(*fit_recalibration(y[cal], pr[cal]))
        test = ~cal
        site = pd.read_csv(run / "evaluations" / "queensland" / "scores.csv")
        rows.append(dict(seed=seed, raw=calibration(y[test], pr[test])["ece"],
                         oof_fit=calibration(y[test], by_oof.apply(pr[test]))["ece"],
                         cal_fit=calibration(y[test], by_cal.apply(pr[test]))["ece"],
                         auc_raw=auc(y[test], pr[test]), auc_after=auc(y[test], by_cal.apply(pr[test])),
                         site_raw=calibration(site["target"], site["pred"])["ece"],
                         site_oof_fit=calibration(site["target"], by_oof.apply(site["pred"]))["ece"],
                         test_images=int(test.sum()), test_melanomas=int(y[test].sum())))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        sys.exit(f"no run-s*-cc0 folder in {a.work}: run benchmarks/cross_site.py --work {a.work} first")
    df = pd.DataFrame(rows)
    md = ["| seeds | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES),
          f"| {len(df)} | " + " | ".join(mean_sd(df[f], 4) for f in FIGURES) + " |"]
    write_table(a.out, md, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
