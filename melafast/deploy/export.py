"""`melafast export`: a run's fold models as ONNX, with everything `predict` does beside them as JSON.

Each fold model becomes `fold<k>.onnx`: inputs `image` (N, 3, H, W floats in [0, 1]; the run's normalisation is
inside the graph) and, for a model with metadata, `meta` (N, width of its metadata vector); output
`melanoma_probability` (N). The batch size is dynamic. `melafast_export.json` holds the rest: each model's input
size and metadata encoding, the run's TTA, the blend (mean of the fold models), the operating point when the run has
one, and how tables write holes. `melafast.onnx` predicts from that folder with numpy, Pillow and onnxruntime only.
"""

from __future__ import annotations

import datetime
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MelafastError

__all__ = ["export_run", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18


class _Probability(torch.nn.Module):
    "The model as exported: image (+ metadata) in, the melanoma probability out (softmax inside the graph)."

    def __init__(self, model, pos: int, meta: bool):
        super().__init__()
        self.model, self.pos, self.meta = model, pos, meta

    def forward(self, image, meta=None):
        logits = self.model(image, meta if self.meta else None)
        return torch.softmax(logits.float(), dim=-1)[:, self.pos]


def _export_one(predictor, path: Path, opset: int):
    import onnx

    model = predictor.model.float().eval()
    model.channels_last = False
    size, proc = int(predictor.spec.size), predictor.meta_proc
    wrapper = _Probability(model, int(predictor.spec.pos), proc is not None).eval()
    image = torch.rand(2, 3, size, size)
    args = (image, torch.zeros(2, proc.n_features)) if proc is not None else (image,)
    names = ["image", "meta"] if proc is not None else ["image"]
    axes = {n: {0: "batch"} for n in [*names, "melanoma_probability"]}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter on purpose (dynamo=False: no extra dependency); torch says it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["melanoma_probability"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return args, wrapper


def export_run(run, out, opset: int = DEFAULT_OPSET, log: Callable = print) -> Path:
    """Export every fold model of `run` to the new (or empty) folder `out`, check each with `onnx.checker` and
    against torch on random inputs, and write the manifest `melafast.onnx` reads. Returns `out`."""
    from ..inference import load_predictor
    from ..inference.inputs import upload_refusal
    from ..onnx import MANIFEST
    from ..runfolder import RunFolder

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MelafastError("export needs onnx and onnxruntime: pip install 'melafast[deploy]'") from None
    folder, out = RunFolder(run), Path(out)
    dirs = folder.model_dirs()  # a run without fold models stops here, saying so
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MelafastError(f"{out} exists and is not an empty folder: export into a new one")
    predictors = [load_predictor(d) for d in dirs]
    why = upload_refusal(predictors, "the exported runtime")
    if why:
        raise MelafastError(why)
    out.mkdir(parents=True, exist_ok=True)
    models = []
    for d, p in zip(dirs, predictors):
        fold = (p.spec.fold if p.spec.fold is not None else len(models))
        path = out / f"fold{fold}.onnx"
        args, wrapper = _export_one(p, path, opset)
        diff = _check_against_torch(path, wrapper, args)
        log(f"exported {d} to {path} (opset {opset}); onnxruntime vs torch on random inputs: max difference "
            f"{diff:.1e}")
        models.append(dict(file=path.name, fold=fold, size=int(p.spec.size), pos=int(p.spec.pos),
                           meta_proc=p.spec.meta_proc if p.spec.meta else None,
                           validated_precision=p.spec.precision, arch=p.spec.arch))
    from ..data.columns import HOLES, SEXES

    manifest = dict(format=1, run=str(folder.path.resolve()), tta=folder.tta, blend="mean of the fold models", opset=opset,
                    models=models, operating_point=point.to_dict() if (point := folder.operating_point()) else None,
                    recalibration=recal.to_dict() if (recal := folder.recalibration()) else None,
                    metadata_rules=dict(holes=sorted(HOLES), sexes=SEXES),
                    exported=datetime.datetime.now().isoformat(timespec="seconds"),
                    note="fp32 graphs; runs validated in bf16/fp16 on a GPU differ from them by that precision")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out / MANIFEST}: {len(models)} model(s), TTA x{folder.tta}"
        + (f", operating point {manifest['operating_point']['operating_point']}" if manifest["operating_point"] else ""))
    return out


def _check_against_torch(path: Path, wrapper, args) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = session.run(["melanoma_probability"], feeds)[0]
    with torch.no_grad():
        want = wrapper(*args).numpy()
    diff = float(np.abs(got - want).max())
    if not diff < 1e-4:
        raise MelafastError(f"{path}: onnxruntime and torch differ by {diff:.2e} on the same inputs")
    return diff
