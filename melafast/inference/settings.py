"""How a saved model predicts: device, precision, memory layout and determinism, resolved once for every path."""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch

from ..config import PRECISIONS
from ..errors import MelafastError

__all__ = ["resolve_precision", "Settings", "resolve_settings", "inference_settings", "set_determinism",
           "record_nondeterminism", "default_device"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU; checks explicit choices."""
    if precision not in PRECISIONS:
        raise MelafastError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32" and not cuda:
        raise MelafastError(f"precision {precision} needs a CUDA GPU; on the CPU use fp32 (or auto)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise MelafastError("this GPU has no bf16: use --precision fp16 (or auto)")
    return precision


def _can_run(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return True
    return device.type == "cuda" and (precision == "fp16" or torch.cuda.is_bf16_supported())


@dataclass
class Settings:
    """How one model predicts: where, in which precision and memory layout, and why if not as validated."""

    device: torch.device  # where the model runs
    precision: str  # fp32, bf16 or fp16 (autocast)
    channels_last: bool  # weights and images stored channels-last
    note: str = ""  # how these differ from what the model was validated with, and why; "" when they do not

    @property
    def amp_dtype(self):
        return _AMP.get(self.precision)

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        return f"{self.precision}{', channels-last' if self.channels_last else ''} on {self.device.type}"


def resolve_settings(spec, device=None, precision: str | None = None) -> Settings:
    """The settings a saved model predicts with: the precision and memory layout its `ModelSpec` records (what
    training resolved to, and what its out-of-fold predictions were made with) where `device` can run them, else
    fp32; `precision` (auto, bf16, fp16, fp32) overrides the recorded one."""
    device = torch.device(device) if device is not None else default_device()
    validated, layout = spec.precision, spec.channels_last
    channels_last = bool(layout) if layout is not None else device.type == "cuda"
    if precision is not None:
        chosen = resolve_precision(precision, device)
        note = f"precision {chosen} as asked (validated in {validated})" if validated and chosen != validated else ""
    elif validated is None:  # saved before melafast recorded it: the rule of that time
        chosen = resolve_precision("auto", device)
        note = f"the model does not record the precision it was validated with (an older run): predicting in {chosen}"
    elif _can_run(validated, device):
        chosen, note = validated, ""
    else:
        chosen = "fp32"
        note = (f"validated in {validated}, which this {device.type} cannot run: predicting in fp32 (probabilities may "
                "differ from the out-of-fold ones in the third decimal; --precision to choose)")
    return Settings(device, chosen, channels_last, note)


def inference_settings(model, device, precision: str = "auto", channels_last: bool | None = None):
    """Put `model` on `device` in eval mode with the given precision rule and memory layout (default: channels-last
    on GPUs); return the autocast dtype (None for fp32). On GPUs cuDNN autotunes its kernels unless deterministic
    algorithms were asked for."""
    device = torch.device(device)
    settings = Settings(device, resolve_precision(precision, device),
                        device.type == "cuda" if channels_last is None else channels_last)
    prepare_model(model, settings)
    return settings.amp_dtype


def prepare_model(model, settings: Settings):
    "Put `model` where and how `settings` say, in eval mode."
    model.to(settings.device).eval()
    model.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    model.channels_last = settings.channels_last
    if settings.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True
    return model


def set_determinism(deterministic: bool):
    """Deterministic algorithms (and no cuDNN autotuning) or the fastest ones.

    What `deterministic=True` guarantees: on the same machine, with the same software and seed, every operation that
    has a deterministic kernel gives the same bits each run. torch has no deterministic kernel for a few GPU
    operations; those still run (they are only warned about), and `record_nondeterminism` lists them, so a run can
    say which of its numbers may move in the last digits. The CPU repeats either way.
    """
    import os

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    if deterministic or torch.are_deterministic_algorithms_enabled():  # turning it off when off imports torch's
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # compiler stack: 1.5 s of every predict
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


_NONDET = re.compile(r"^(.+?) does not have a deterministic implementation")


@contextlib.contextmanager
def record_nondeterminism():
    """Collect the operations torch ran without a deterministic kernel while deterministic algorithms were asked for;
    yields a list that fills with their names (each once), and lets every other warning through."""
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        others = []
        for w in caught:
            m = _NONDET.match(str(w.message))
            if m and torch.are_deterministic_algorithms_enabled():
                if m.group(1) not in found:
                    found.append(m.group(1))
            else:
                others.append(w)
        seen = set()
        for w in others:  # outside the recording, once each: they go where they would have gone
            key = (str(w.message), w.category, w.filename, w.lineno)
            if key not in seen:
                seen.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


