"""How long `melafast stack`'s cross-fitting takes at ISIC 2024's size: --rows synthetic rows (0.1% melanomas, about
400 rows per patient, 5 patient-grouped folds), --columns table columns (one of them informative) and an image score
last, fitted with --model exactly as `melafast stack` fits a run's out-of-fold rows. Prints the seconds, each fold's
rounds and weight, and the AUC of the image score and of the stack.

    python benchmarks/stack_scale.py --rows 400000 --columns 40
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _emit import emit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--columns", type=int, default=40)
    p.add_argument("--model", default="trees")
    p.add_argument("--bags", type=int, default=5)
    p.add_argument("--positive-rate", type=float, default=0.001, help="melanomas among the rows (ISIC 2024: 0.1%%)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    from melafast.inference.learners import learner
    from melafast.inference.stackfit import cross_fit
    from melafast.metrics import auc

    rng = np.random.default_rng(0)
    y = (rng.random(a.rows) < a.positive_rate).astype(int)
    patients = rng.integers(0, max(a.rows // 400, 10), a.rows)
    X = rng.normal(size=(a.rows, a.columns + 1))
    X[:, 0] += 1.0 * y  # one informative table column
    X[:, -1] += 1.5 * y  # the image score
    t0 = time.perf_counter()
    stacked, _, fits = cross_fit(learner(a.model), X, y, patients % 5, patients.astype(str), bags=a.bags, seed=0,
                                 log=print)
    return emit(dict(rows=a.rows, columns=a.columns, model=a.model, bags=a.bags,
                     seconds=round(time.perf_counter() - t0, 1), rounds=[f.rounds for f in fits],
                     weights=[f.weight for f in fits], image_auc=round(auc(y, X[:, -1]), 4),
                     stack_auc=round(auc(y, stacked), 4)), a.out)


if __name__ == "__main__":
    main()
