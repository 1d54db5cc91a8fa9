"""Predict with an exported run (`melafast export`) without torch, fastai or pandas: numpy, Pillow and onnxruntime.

    from melafast.onnx import load
    run = load("exported/")                       # every fold model and the run's TTA, metadata encoding, blend
    table = run.predict("new_images/", meta="new_images.csv")   # [{image_name, pred[, decision, votes]}, ...]

    python -m melafast.onnx exported/ new_images/ --meta new_images.csv --out preds.csv

It predicts exactly as `melafast predict` does: each image opened as RGB (JPEGs decoded at a reduced scale when far
larger than the input), squashed to the input size with bilinear resampling, scaled to [0, 1]; the metadata encoded
with each fold's own vocabulary and scaling (holes and unknown values as in training); the mean of the melanoma
probability over the run's dihedral views and over the fold models; and, when the run has a saved operating point,
the same decision as `melafast.operating.decide` (the vote of the fold models against its threshold, or the fold mean
against it for a point chosen on a calibration set). This module imports nothing from the rest of melafast, so that
rule is written again here; tests/test_export.py checks the two agree.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["load", "ExportedRun", "MANIFEST", "IMAGE_EXTS"]

MANIFEST = "melafast_export.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ExportError(Exception):
    """A problem with an exported run or its inputs, said in one line."""


def _view(x: np.ndarray, k: int) -> np.ndarray:
    "Dihedral view `k` (0-7) of a batch (N, C, H, W), as melafast.tta defines it: bit 4 transposes, 1 flips W, 2 H."
    if k & 4:
        x = x.swapaxes(-1, -2)
    if k & 1:
        x = x[..., ::-1]
    if k & 2:
        x = x[..., ::-1, :]
    return np.ascontiguousarray(x)


def open_image_array(path, size: int) -> np.ndarray:
    "One image as the model sees it: (3, size, size) float32 in [0, 1]."
    from PIL import Image

    try:
        im = Image.open(path)
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:
        raise ExportError(f"cannot read image {path} ({str(e).splitlines()[0][:80]})") from None
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


class _Meta:
    "A fold's metadata encoding (melafast's MetaProcessor), from its JSON."

    def __init__(self, d: dict, rules: dict):
        self.cat, self.cont = list(d["cat_names"]), list(d["cont_names"])
        self.vocab, self.means, self.stds = d["vocab"], d["means"], d["stds"]
        self.fill = d.get("fill", self.means)  # a hole's fill value (runs saved before it: the mean)
        self.holes, self.sexes = set(rules["holes"]), rules["sexes"]

    def _value(self, column, v):
        "The cleaned value of `column` (None when it is a hole), as melafast reads a table."
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        text = str(v).strip()
        if text.lower() in self.holes:
            return None
        if column == "sex":
            sex = self.sexes.get(text.lower())
            if sex is None:
                raise ExportError(f"sex must be male, female, m or f (or empty), got {v!r}")
            return sex
        if column in self.cont:
            try:
                x = float(text)
            except ValueError:
                raise ExportError(f"{column} must be a number, got {v!r}") from None
            if column == "age_approx" and not 0 <= x <= 120:
                raise ExportError(f"age_approx must be an age in years (0 to 120), got {v!r}")
            return x
        try:  # a numeric category, as melafast reads it: 3, 3.0 and '3.0' are all '3'
            x = float(text)
            if x.is_integer() and column not in ("sex", "anatom_site_general_challenge"):
                return str(int(x))
        except ValueError:
            pass
        return text.lower()

    def encode(self, row: dict) -> np.ndarray:
        out = []
        for c in self.cont:
            v = self._value(c, row.get(c))
            hole = v is None  # filled as FillMissing fills it, with the flag up
            out += [((self.fill[c] if hole else v) - self.means[c]) / self.stds[c], float(hole)]
        for c in self.cat:
            voc, v = self.vocab[c], self._value(c, row.get(c))
            hot = [0.0] * (len(voc) + 2)
            if v is None:
                hot[-1] = 1.0
            else:
                hot[voc.index(v) if v in voc else len(voc)] = 1.0
            out += hot
        return np.asarray(out, dtype=np.float32)


class ExportedRun:
    """The fold models of an exported run as onnxruntime sessions, with what `predict` needs beside them."""

    def __init__(self, folder, providers=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("predicting from an export needs onnxruntime: pip install onnxruntime "
                              "(or melafast[deploy])") from None

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise ExportError(f"{self.folder} is not an exported run: it has no {MANIFEST} (make one with "
                              "`melafast export --run RUN --out DIR`)")
        self.manifest = json.loads(manifest.read_text())
        self.tta = int(self.manifest["tta"])
        self.operating_point = self.manifest.get("operating_point")
        self.recalibration = self.manifest.get("recalibration")  # melafast recalibrate's slope and shift, if any
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.models = []
        for m in self.manifest["models"]:
            session = ort.InferenceSession(str(self.folder / m["file"]), opts,
                                           providers=providers or ["CPUExecutionProvider"])
            meta = _Meta(m["meta_proc"], self.manifest["metadata_rules"]) if m.get("meta_proc") else None
            self.models.append((m, session, meta))

    def _views(self, session, images, meta) -> np.ndarray:
        views = [0, 1, 2, 3, 4, 5, 6, 7][: self.tta] if self.tta in (1, 2, 4, 8) else [0]
        total = 0.0
        for k in views:
            feeds = {"image": _view(images, k)}
            if meta is not None:
                feeds["meta"] = meta
            total = total + session.run(["melanoma_probability"], feeds)[0].astype(np.float64)
        return total / len(views)

    def predict(self, images, meta=None, bs: int = 32) -> list:
        """One dict per image, in order: image_name, pred (the fold models' mean melanoma probability), with a
        recalibration pred_calibrated, and, with a saved operating point, decision (1: melanoma) and votes. `images`: a folder, an image path or a list of
        paths; `meta`: a CSV path or a list of dicts with image_name and any of sex, age_approx,
        anatom_site_general_challenge (images it does not list: every field unknown)."""
        paths = _image_paths(images)
        rows = _meta_rows(meta)
        names = [p.stem for p in paths]
        per_model = [np.zeros(len(paths)) for _ in self.models]
        for start in range(0, len(paths), bs):
            chunk = paths[start:start + bs]
            for i, (m, session, proc) in enumerate(self.models):
                batch = np.stack([open_image_array(p, int(m["size"])) for p in chunk])
                enc = None if proc is None else np.stack([proc.encode(rows.get(p.stem, {})) for p in chunk])
                per_model[i][start:start + len(chunk)] = self._views(session, batch, enc)
        pred = np.mean(per_model, axis=0)
        out = [{"image_name": n, "pred": float(p)} for n, p in zip(names, pred)]
        if self.recalibration is not None:  # monotone: rankings and decisions stay those of pred
            r = self.recalibration
            z = np.clip(pred, 1e-7, 1 - 1e-7)
            cal = 1.0 / (1.0 + np.exp(-(r["slope"] * np.log(z / (1 - z)) + r["shift"])))
            for row, c in zip(out, cal):
                row["pred_calibrated"] = float(c)
        if self.operating_point is not None:
            point = self.operating_point
            votes = (np.asarray(per_model) >= point["threshold"]).sum(axis=0)
            # chosen on a calibration set: the fold mean against the threshold; on out-of-fold scores: the vote
            calls = (np.mean(per_model, axis=0) >= point["threshold"] if point.get("scale") == "ensemble"
                     else 2 * votes >= len(self.models))
            for row, v, c in zip(out, votes, calls):
                row["decision"] = int(c)
                if point.get("scale") != "ensemble":  # the fold mean decides: pred is the reason, not a vote
                    row["votes"] = int(v)
        return out


def _image_paths(images) -> list:
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        paths = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise ExportError(f"{images} holds no images ({', '.join(IMAGE_EXTS)})")
        return paths
    paths = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExportError(f"{len(missing)} image file(s) not found: {', '.join(missing[:3])}")
    return paths


def _meta_rows(meta) -> dict:
    "image_name -> its row of metadata."
    if meta is None:
        return {}
    if isinstance(meta, (str, os.PathLike)):
        with open(meta, newline="", encoding="utf-8") as f:
            meta = list(csv.DictReader(f))
    rows = {}
    for r in meta:
        r = dict(r)
        if "image_name" not in r and "isic_id" in r:  # the ISIC 2024 layout, read as melafast reads it
            r["image_name"] = r["isic_id"]
        if "anatom_site_general" in r and "anatom_site_general_challenge" not in r:
            r["anatom_site_general_challenge"] = r["anatom_site_general"]
        if "image_name" not in r:
            raise ExportError("the metadata needs an image_name (or isic_id) column")
        rows[str(r["image_name"]).strip()] = r
    return rows


def load(folder, providers=None) -> ExportedRun:
    """An exported run, ready to `.predict(images, meta=None)`."""
    return ExportedRun(folder, providers)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m melafast.onnx", description="Predict with a run exported by "
                                "`melafast export` (numpy, Pillow and onnxruntime only).")
    p.add_argument("export", help="the folder `melafast export` wrote")
    p.add_argument("images", help="a folder of images, or one image")
    p.add_argument("--meta", help="CSV of image_name, sex, age_approx, anatom_site_general_challenge")
    p.add_argument("--out", default="preds.csv", help="CSV to write: image_name, pred[, decision, votes]")
    a = p.parse_args(argv)
    try:
        rows = load(a.export).predict(a.images, a.meta)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out}: {len(rows)} predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
