"""Which process this is under a launcher (torchrun, accelerate): how many there are, and which one writes.

Read from the launcher's environment only, so that every layer (progress bars, run folders, training) can ask
without importing torch.distributed; `melafast.train.distributed` joins the process group.
"""

from __future__ import annotations

import os

__all__ = ["world_size", "rank", "is_main"]


def world_size() -> int:
    """Number of processes started by the launcher (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """True in the process that writes files and prints results."""
    return rank() == 0
