"""CPU images per second of one run's prediction: `melafast predict` (torch, `load_predictor`) against the exported
ONNX models (`melafast.onnx`, onnxruntime), on the same images with the same TTA and metadata. Both include decoding
the images. Prints one JSON object: images, TTA, fold models, seconds and images/s of each (best of --repeats), the
largest difference between their probabilities, and the speed-up.

    python benchmarks/onnx_speed.py --run runs/b3 --images new_patients/ --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from _emit import emit

warnings.filterwarnings("ignore")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished run folder")
    p.add_argument("--images", required=True, help="folder of images (or --list of paths)")
    p.add_argument("--limit", type=int, default=None, help="the first N images of the folder only")
    p.add_argument("--meta", default=None, help="metadata CSV for the images")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: theirs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from melafast.deploy.export import export_run
    from melafast.inference import load_predictor
    from melafast.onnx import IMAGE_EXTS, load

    paths = sorted(q for q in Path(a.images).iterdir() if q.suffix.lower() in IMAGE_EXTS)[: a.limit]
    if a.threads:
        torch.set_num_threads(a.threads)
    predictor = load_predictor(a.run)
    with tempfile.TemporaryDirectory() as tmp:
        export_run(a.run, Path(tmp) / "onnx", log=lambda m: None)
        runtime = load(Path(tmp) / "onnx")
        if a.threads:
            import onnxruntime as ort

            for i, (m, _, proc) in enumerate(runtime.models):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = a.threads
                runtime.models[i] = (m, ort.InferenceSession(str(Path(tmp) / "onnx" / m["file"]), opts,
                                                             providers=["CPUExecutionProvider"]), proc)
        times = {"torch": [], "onnx": []}
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            want = predictor.predict(paths, meta=a.meta, bs=a.bs, num_workers=0, progress=False)
            times["torch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = runtime.predict(paths, meta=a.meta, bs=a.bs)
            times["onnx"].append(time.perf_counter() - t0)
    diff = float(np.abs(np.asarray([r["pred"] for r in got]) - want).max())
    res = dict(run=str(a.run), images=len(paths), tta=predictor.tta, models=len(predictor.predictors), bs=a.bs,
               threads=a.threads or torch.get_num_threads(), torch_s=round(min(times["torch"]), 3),
               onnx_s=round(min(times["onnx"]), 3), max_abs_diff=diff)
    res["torch_img_s"] = round(len(paths) / res["torch_s"], 1)
    res["onnx_img_s"] = round(len(paths) / res["onnx_s"], 1)
    res["speedup"] = round(res["torch_s"] / res["onnx_s"], 2)
    return emit(res, a.out)


if __name__ == "__main__":
    main()
