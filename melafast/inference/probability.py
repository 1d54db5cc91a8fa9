"""The probabilities every surface gives beside `pred` (the fold mean): recalibrated, and at another prevalence."""

from __future__ import annotations

import numpy as np

__all__ = ["probability_columns"]


def probability_columns(pred, recalibration=None, trained: float | None = None,
                        prevalence: float | None = None) -> dict:
    """`pred_calibrated`, the run's recalibration of `pred` (see `record.Recalibration`; monotone, so rankings and
    decisions are unchanged), when it has one; and, with `prevalence`, `pred_at_prevalence`: the probability where
    that share of lesions are melanomas, moved from the recalibrated probability and the share it was fitted at when
    the run has a recalibration, else from `pred` and `trained` (the share the run learnt from)."""
    from ..metrics import at_prevalence

    pred = np.asarray(pred, dtype=np.float64)
    cols, base, share = {}, pred, trained
    if recalibration is not None:
        cols["pred_calibrated"] = base = recalibration.apply(pred)
        share = recalibration.prevalence if recalibration.prevalence is not None else trained
    if prevalence is not None:
        cols["pred_at_prevalence"] = at_prevalence(base, share, prevalence)
    return cols
