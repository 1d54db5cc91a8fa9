"""Random numbers of their own for the metadata side of training, so the image side draws what it draws alone."""

from __future__ import annotations

import torch

__all__ = ["SideGenerator"]


class SideGenerator:
    """Random numbers of the metadata side of training (its dropout masks, metadata dropout), from generators of
    their own, one per device, seeded once: torch's global generator then serves the image side alone, which draws
    exactly what it draws in an image-only model trained with the same seed."""

    def __init__(self, seed: int):
        self.seed, self._gens = int(seed), {}

    def __call__(self, device) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device)
            self._gens[device].manual_seed(self.seed)
        return self._gens[device]

    def __getstate__(self):  # generators do not pickle or deep-copy: a copy starts the stream again
        return {"seed": self.seed}

    def __setstate__(self, state):
        self.seed, self._gens = state["seed"], {}
