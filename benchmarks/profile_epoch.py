"""Where the time of a melafast training epoch goes, per batch: waiting for data (loading, decoding, item and
batch transforms, host-to-device copy), forward, loss, backward, optimizer step, and the rest (callbacks, metrics).

Each phase boundary synchronises the GPU, so the phases add up to a little more than an unprofiled epoch; use
benchmarks/throughput.py for the speed itself. Prints one JSON object.

    python benchmarks/profile_epoch.py --small                                   # CPU, seconds: checks the script
    python benchmarks/profile_epoch.py --arch efficientnet_b3 --size 384 --bs 64 # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

PHASES = ("data", "forward", "loss", "backward", "step", "rest")


def _phase_timer(device):
    import torch
    from fastai.callback.core import Callback

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class PhaseTimer(Callback):
        "Adds up, per phase, the time between fastai's training events (training batches only)."
        order = 100  # after the other callbacks of each event

        def before_train(self):
            self.totals, self.batches, self.mark = defaultdict(float), 0, now()

        def _lap(self, phase):
            if not self.training:  # validation batches go through the same events
                return
            t = now()
            self.totals[phase] += t - self.mark
            self.mark = t

        def before_batch(self): self._lap("data")
        def after_pred(self): self._lap("forward")
        def after_loss(self): self._lap("loss")
        def after_backward(self): self._lap("backward")
        def after_step(self): self._lap("step")

        def after_batch(self):
            if self.training:
                self._lap("rest")
                self.batches += 1

    return PhaseTimer()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_b3")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--images", type=int, default=1280)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--small", action="store_true", help="tiny CPU-sized settings: checks the script, not the speed")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.arch, a.size, a.bs, a.images, a.workers = "mobilenetv3_small_050", 64, 16, 64, min(a.workers, 2)

    import numpy as np
    import torch

    from melafast.data import load_competition, make_sample, melanoma_dls
    from melafast.train.learner import melanoma_learner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_sample(os.path.join(tmp, "data"), n_train=a.images + a.bs, n_test=1, px=a.size, seed=0)
        df, _ = load_competition(data)
        df["fold"] = np.r_[np.zeros(a.images, int), np.ones(a.bs, int)]
        dls = melanoma_dls(df, fold=1, size=a.size, bs=a.bs, num_workers=a.workers, device=device)
        learn = melanoma_learner(dls, a.arch, pretrained=False, compile=a.compile)
        learn.unfreeze()
        timer = _phase_timer(device)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-4)  # warm-up: worker start, kernel selection, compilation
            t0 = time.perf_counter()
            learn.fit(1, 1e-4, cbs=timer)
            wall = time.perf_counter() - t0  # the whole fit: training batches, validation, callbacks
    total = sum(timer.totals.values())
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
               arch=a.arch, size=a.size, bs=a.bs, workers=a.workers, precision=learn.precision, batches=timer.batches,
               profiled_s=round(total, 4), fit_wall_s=round(wall, 4),
               img_s=round(timer.batches * a.bs / total, 1),
               ms_per_batch={k: round(1000 * timer.totals[k] / timer.batches, 2) for k in PHASES},
               share={k: round(timer.totals[k] / total, 3) for k in PHASES})
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
