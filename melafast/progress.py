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

__all__ = ["interactive", "progress", "LineProgress", "RunClock"]


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


class RunClock:
    """Where a run of several folds stands, for its progress lines: "fold 1 (2/5)" (the fold, and how many of the
    run's folds that makes), and the time left in the whole run, from the folds done so far (or, in the first fold,
    from its epochs so far)."""

    def __init__(self, folds: list, epochs_per_fold: int):
        self.folds, self.epochs_per_fold = list(folds), max(int(epochs_per_fold), 1)
        self.done, self.position, self.t_fold, self.epochs, self.fold = [], 0, None, 0, None

    def start_fold(self, k) -> None:
        self.position = self.folds.index(k) + 1 if k in self.folds else self.position + 1
        self.fold = k
        self.t_fold, self.epochs = time.perf_counter(), 0

    def epoch_done(self) -> None:
        self.epochs += 1

    def end_fold(self) -> None:
        if self.t_fold is not None:
            self.done.append(time.perf_counter() - self.t_fold)

    @property
    def prefix(self) -> str:
        return f"fold {self.fold} ({self.position}/{len(self.folds)})"

    def left(self) -> float | None:
        "Seconds left in the run, or None before anything can be timed."
        if self.t_fold is None:
            return None
        in_fold = time.perf_counter() - self.t_fold
        if self.done:
            per_fold = sum(self.done) / len(self.done)
        elif self.epochs:
            per_fold = in_fold / self.epochs * self.epochs_per_fold
        else:
            return None
        return max(per_fold - in_fold, 0.0) + per_fold * (len(self.folds) - self.position)

    def eta(self) -> str:
        left = self.left()
        return "" if left is None else f"run ETA {_clock(left)}"


class LineProgress(Callback):
    """fastai's progress display for logs: one line per epoch with the losses and metrics, training images per
    second and the time left in the fit; lr_find gets one line when it ends. No per-batch output, no host sync."""

    order = 60  # where fastai's ProgressCallback sits: after the Recorder has logged the epoch
    clock: RunClock | None = None  # set by a run: its lines then say which fold, and the time left in the run
    every = 30.0  # seconds between lr_find's lines: a long one is never silent

    @property
    def name(self):
        return "progress"  # the name fastai's `no_bar()` and `learn.progress` look for

    def before_fit(self):
        self.t_fit, self.images, self.iters = time.perf_counter(), 0, 0
        self.t_said = self.t_fit
        self.old_logger = None
        if hasattr(self.learn, "lr_finder") and _main_process():
            print(self._prefix() + f"lr_find: up to {self.n_epoch * len(self.dls.train)} iterations", flush=True)
        if self.learn.logger is not _learner_noop:  # no_logging() (e.g. in lr_find) prints nothing per epoch
            self.old_logger, self.learn.logger = self.learn.logger, self._write

    def before_train(self):
        self.t_train, self.images = time.perf_counter(), 0

    def after_batch(self):
        if self.training:
            self.images += find_bs(self.learn.yb)
            self.iters += 1
            now = time.perf_counter()
            if hasattr(self.learn, "lr_finder") and now - self.t_said >= self.every and _main_process():
                self.t_said = now
                print(self._prefix() + f"lr_find: {self.iters} iterations in {now - self.t_fit:.0f} s", flush=True)

    def _prefix(self) -> str:
        return "" if self.clock is None else self.clock.prefix + " · "

    def after_train(self):
        self.train_s = time.perf_counter() - self.t_train

    def _write(self, log):
        if not _main_process():
            return
        names, epoch = self.recorder.metric_names, int(log[0])
        frozen = getattr(self.opt, "frozen_idx", 0) > 0
        if self.clock is not None:
            self.clock.epoch_done()
        parts = ([self.clock.prefix] if self.clock is not None else [])
        parts += [f"epoch {epoch + 1}/{self.n_epoch}" + (" (frozen)" if frozen else "")]
        parts += [f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names[1:], log[1:])]
        elapsed = time.perf_counter() - self.t_fit
        left = elapsed / (epoch + 1) * (self.n_epoch - epoch - 1)
        parts += [f"{self.images / max(getattr(self, 'train_s', 0), 1e-9):.0f} img/s", f"ETA {_clock(left)}"]
        if self.clock is not None and self.clock.eta():
            parts.append(self.clock.eta())
        print(" · ".join(parts), flush=True)

    def after_fit(self):
        if self.old_logger is not None:
            self.learn.logger = self.old_logger
        if hasattr(self.learn, "lr_finder") and _main_process():
            print(self._prefix() + f"lr_find: {self.iters} iterations in {time.perf_counter() - self.t_fit:.1f} s",
                  flush=True)

