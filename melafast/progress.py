"""Progress that reads well where it is shown: live bars in a terminal or a notebook, one line per phase in a log.

A progress bar redraws itself many times a second. In a terminal or a notebook that is what people want; written
to a file (CI, Kaggle's saved notebook logs, SLURM, `| tee`) every redraw becomes one more line, and a fold of a few
epochs leaves hundreds of them around the dozen that matter. When stdout is neither a terminal nor a notebook,
melafast prints one line per epoch (losses, metrics, training images per second, time left) and one line per
other long phase (lr_find, TTA, image checks) instead.
"""

from __future__ import annotations

import sys
import time

from fastai.callback.core import Callback
from fastai.learner import noop as _learner_noop  # what Learner.no_logging() puts in place of the logger
from fastai.torch_core import find_bs

__all__ = ["interactive", "progress", "LineProgress"]


def interactive() -> bool:
    """True where live progress bars read well: in a notebook, or when stdout is a terminal."""
    try:
        from fastprogress.core import IN_NOTEBOOK
    except ImportError:  # fastprogress < 1.1
        from fastprogress.fastprogress import IN_NOTEBOOK
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(IN_NOTEBOOK) or bool(isatty and isatty())


def _main_process() -> bool:
    from .processes import is_main

    return is_main()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def progress(items, total: int | None = None, label: str = "", size=None, unit: str = "images", display: bool = True):
    """Iterate `items` showing progress: a live bar where that reads well, else one line at the end (`label`, how
    many `unit`s, seconds, rate). `size(item)` counts the units in an item (default 1); nothing is shown when
    `display` is False or in a process other than the main one."""
    if not display or not _main_process():
        yield from items
        return
    if interactive():
        from fastprogress.fastprogress import progress_bar

        yield from progress_bar(items, total=total, leave=False)
        return
    t0, n = time.perf_counter(), 0
    for item in items:
        n += size(item) if size is not None else 1
        yield item
    seconds = time.perf_counter() - t0
    print(f"{label or 'done'}: {n} {unit} in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} {unit}/s)", flush=True)


class LineProgress(Callback):
    """fastai's progress display for logs: one line per epoch with the losses and metrics, training images per
    second and the time left in the fit; lr_find gets one line when it ends. No per-batch output, no host sync."""

    order = 60  # where fastai's ProgressCallback sits: after the Recorder has logged the epoch

    @property
    def name(self):
        return "progress"  # the name fastai's `no_bar()` and `learn.progress` look for

    def before_fit(self):
        self.t_fit, self.images, self.iters = time.perf_counter(), 0, 0
        self.old_logger = None
        if self.learn.logger is not _learner_noop:  # no_logging() (e.g. in lr_find) prints nothing per epoch
            self.old_logger, self.learn.logger = self.learn.logger, self._write

    def before_train(self):
        self.t_train, self.images = time.perf_counter(), 0

    def after_batch(self):
        if self.training:
            self.images += find_bs(self.learn.yb)
            self.iters += 1

    def after_train(self):
        self.train_s = time.perf_counter() - self.t_train

    def _write(self, log):
        if not _main_process():
            return
        names, epoch = self.recorder.metric_names, int(log[0])
        frozen = getattr(self.opt, "frozen_idx", 0) > 0
        parts = [f"epoch {epoch + 1}/{self.n_epoch}" + (" (frozen)" if frozen else "")]
        parts += [f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names[1:], log[1:])]
        elapsed = time.perf_counter() - self.t_fit
        left = elapsed / (epoch + 1) * (self.n_epoch - epoch - 1)
        parts += [f"{self.images / max(getattr(self, 'train_s', 0), 1e-9):.0f} img/s", f"ETA {_clock(left)}"]
        print(" · ".join(parts), flush=True)

    def after_fit(self):
        if self.old_logger is not None:
            self.learn.logger = self.old_logger
        if hasattr(self.learn, "lr_finder") and _main_process():
            print(f"lr_find: {self.iters} iterations in {time.perf_counter() - self.t_fit:.1f} s", flush=True)

