"""`melafast serve`: a local web page to try a run, and a JSON endpoint for the same prediction.

Drop one or more dermoscopic images on the page, optionally with age, sex and site; each gets the melanoma
probability (the mean of the run's fold models over its TTA views, exactly as `melafast predict`), the decision at
the run's operating point when it has one, and the Grad-CAM map beside the image. Uploads stay in memory: the server
writes nothing. It binds to 127.0.0.1 unless told otherwise, refuses uploads over --max-mb and anything that is not
an image. Standard library only (http.server); one prediction at a time.

    POST /api/predict?sex=female&age=55&site=torso   body: the image file's bytes   -> JSON
    GET  /api/info                                                                   -> the run, its models, TTA
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from .errors import DataError, MelafastError

__all__ = ["Service", "make_server", "serve"]

MAX_MB = 20  # default upload limit


class Service:
    """What the server does with one upload: a run's fold models, one prediction at a time."""

    def __init__(self, run, device=None, precision: str | None = None):
        from .inference import load_predictor
        from .inference.settings import default_device

        predictor = load_predictor(run)
        self.run = Path(run)
        self.models = getattr(predictor, "predictors", [predictor])
        self.predictor, self.tta = predictor, predictor.tta
        self.point = getattr(predictor, "operating_point", None)
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = precision
        self.lock = threading.Lock()

    def info(self) -> dict:
        return dict(run=self.run.resolve().name, models=len(self.models), tta=self.tta,
                    folds=[m.config.get("fold") for m in self.models], metadata=any(m.meta_proc for m in self.models),
                    operating_point=None if self.point is None else
                    {k: self.point[k] for k in ("operating_point", "goal", "threshold", "rule")})

    def predict(self, data: bytes, name: str = "upload", sex=None, age=None, site=None) -> dict:
        """The prediction for one image file's bytes with its (optional) metadata."""
        import pandas as pd
        from PIL import Image, UnidentifiedImageError

        from .data import clean_metadata
        from .explain import grad_cam
        from .inference.loop import predict_probs_multi
        from .inference.settings import _prepare, resolve_settings
        from .onnx import ExportError, _open

        try:
            Image.open(io.BytesIO(data)).verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise DataError(f"{name} is not an image this server can read (JPEG, PNG, BMP, TIFF or WebP)") from None
        row = pd.DataFrame([{"image_name": name, "sex": sex or None, "age_approx": age or None,
                             "anatom_site_general_challenge": site or None}])
        row = clean_metadata(row, "the form")  # a value that cannot be what its field means: one clear message
        probs, maps, views = [], [], None
        with self.lock:
            for p in self.models:
                size = int(p.config["size"])
                try:
                    img = torch.from_numpy(_open(io.BytesIO(data), size))[None].to(self.device)
                except ExportError as e:
                    raise DataError(str(e)) from None
                meta = (torch.from_numpy(p.meta_proc.encode(row)).to(self.device) if p.meta_proc is not None else None)
                s = resolve_settings(p.config, self.device, self.precision)
                _prepare(p.model, s)
                batches = [(img, meta) if meta is not None else (img,)]
                prob = predict_probs_multi([p.model], batches, [slice(None) if meta is not None else None], n=self.tta,
                                           amp_dtype=s.amp_dtype, n_inp=len(batches[0]), progress=False)[0]
                probs.append(float(prob[0, p.config["pos"]]))
                with s.autocast():
                    maps.append(grad_cam(p.model, img, meta, p.config["pos"])[0])
                views = (img[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        out = dict(image_name=name, pred=float(np.mean(probs)), per_model=probs, models=len(self.models), tta=self.tta,
                   folds=[m.config.get("fold") for m in self.models],
                   metadata={"sex": _text(row["sex"].iloc[0]), "age_approx": _num(row["age_approx"].iloc[0]),
                             "site": _text(row["anatom_site_general_challenge"].iloc[0])})
        out = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}
        if self.point is not None:
            from .operating import decide

            decision, votes = decide(self.point, [[p] for p in probs])
            out.update(decision=int(decision[0]), votes=int(votes[0]), operating_point=self.point["goal"],
                       threshold=self.point["threshold"])
        out["image_png"], out["cam_png"] = _png(views), _png(_overlay(views, np.mean(maps, axis=0)))
        return out


def _text(v):
    return v if isinstance(v, str) else None


def _num(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _overlay(img: np.ndarray, cam: np.ndarray) -> np.ndarray:
    "The map over the image: red where it raises the melanoma score."
    heat = np.zeros_like(img, dtype=np.float32)
    heat[..., 0] = 255
    alpha = 0.55 * cam[..., None]
    return (img * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).resize((224, 224), Image.NEAREST if pixels.shape[0] < 224 else Image.BILINEAR).save(
        buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>melafast: {run}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
#drop{{border:2px dashed #999;padding:2em;text-align:center;margin:1em 0}}#drop.over{{background:#eef}}
.result{{border-top:1px solid #ddd;padding:1em 0;display:flex;gap:1em;align-items:flex-start}}
.result img{{width:224px;height:224px}}.error{{color:#a33}}.prob{{font-size:1.4em;font-weight:bold}}
label{{margin-right:1em}}.note{{color:#555;font-size:.9em}}</style></head><body>
<h1>melafast: {run}</h1>
<p class="note">{about} Research use only: not a medical device.</p>
<form id="form" onsubmit="return false">
<label>Age <input id="age" type="number" min="0" max="120" step="1"></label>
<label>Sex <select id="sex"><option value="">unknown</option><option>female</option><option>male</option></select></label>
<label>Site <select id="site"><option value="">unknown</option>{sites}</select></label>
<div id="drop">Drop dermoscopic images here, or <input id="files" type="file" accept="image/*" multiple></div>
</form>
<div id="results"></div>
<script>
const results = document.getElementById('results');
function esc(t) {{ const d = document.createElement('div'); d.textContent = t; return d.innerHTML; }}
async function send(file) {{
  const box = document.createElement('div');
  box.className = 'result';
  box.dataset.name = file.name;
  box.textContent = 'scoring ' + file.name + ' ...';
  results.prepend(box);
  const q = new URLSearchParams({{name: file.name, age: document.getElementById('age').value,
    sex: document.getElementById('sex').value, site: document.getElementById('site').value}});
  try {{
    const r = await fetch('/api/predict?' + q, {{method: 'POST', body: file}});
    const j = await r.json();
    if (!r.ok) {{ box.innerHTML = '<span class="error">' + esc(file.name + ': ' + j.error) + '</span>'; return; }}
    let decision = '';
    if (j.decision !== undefined) {{
      decision = '<div class="decision">decision at ' + esc(j.operating_point) + ': <b>' +
        (j.decision ? 'melanoma' : 'not melanoma') + '</b> (' + j.votes + ' of ' + j.models + ' models)</div>';
    }}
    box.innerHTML = '<img alt="image" src="' + j.image_png + '"><img alt="Grad-CAM" src="' + j.cam_png + '">' +
      '<div><div>' + esc(j.image_name) + '</div><div>melanoma probability <span class="prob">' + j.pred.toFixed(4) +
      '</span></div>' + decision + '<div class="note">mean of ' + j.models + ' fold models (folds ' +
      j.folds.join(', ') + '), TTA x' + j.tta +
      '; map: Grad-CAM of the plain view, red raises the score</div></div>';
    box.dataset.pred = j.pred;
  }} catch (e) {{ box.innerHTML = '<span class="error">' + esc(file.name + ': ' + e) + '</span>'; }}
}}
document.getElementById('files').addEventListener('change', e => {{ for (const f of e.target.files) send(f); }});
const drop = document.getElementById('drop');
drop.addEventListener('dragover', e => {{ e.preventDefault(); drop.classList.add('over'); }});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => {{ e.preventDefault(); drop.classList.remove('over');
  for (const f of e.dataTransfer.files) send(f); }});
</script></body></html>
"""

SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")


def _handler(service: Service, max_bytes: int, log: Callable):
    info = service.info()
    about = (f"{info['models']} fold model(s), TTA x{info['tta']}"
             + (f"; decision at {info['operating_point']['goal']} (threshold {info['operating_point']['threshold']:.4f})"
                if info["operating_point"] else "; no operating point saved (`melafast report --operating-point`)")
             + ".")
    page = _PAGE.format(run=html.escape(info["run"]), about=html.escape(about),
                        sites="".join(f"<option>{html.escape(s)}</option>" for s in SITES)).encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "melafast"

        def _send(self, code: int, body: bytes, kind: str):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict):
            self._send(code, json.dumps(obj).encode("utf-8"), "application/json")

        def do_GET(self):
            path = urlparse(self.path).path
            if path == "/":
                self._send(200, page, "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(200, info)
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._json(404, {"error": f"no page {path}"})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/api/predict":
                return self._json(404, {"error": f"no endpoint {url.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > max_bytes:
                self.close_connection = True
                return self._json(413, {"error": f"the upload is {size / 2**20:.1f} MB; this server takes up to "
                                                 f"{max_bytes / 2**20:.3g} MB (--max-mb)"})
            if size == 0:
                return self._json(400, {"error": "no image in the request: POST the image file's bytes"})
            data = self.rfile.read(size)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                res = service.predict(data, q.get("name", "upload"), q.get("sex"), q.get("age"), q.get("site"))
            except DataError as e:
                code = 415 if "not an image" in str(e) else 400
                return self._json(code, {"error": str(e)})
            except MelafastError as e:
                return self._json(400, {"error": str(e)})
            self._json(200, res)

        def log_message(self, fmt, *args):
            log(f"{self.address_string()} {fmt % args}")

    return Handler


def make_server(run, host: str = "127.0.0.1", port: int = 7860, max_mb: float = MAX_MB, device=None,
                precision: str | None = None, log: Callable = print) -> ThreadingHTTPServer:
    """The server for `run` (not yet serving: call `.serve_forever()`); port 0 takes a free one."""
    if max_mb <= 0:
        raise MelafastError(f"--max-mb must be positive, got {max_mb}")
    service = Service(run, device=device, precision=precision)
    try:
        return ThreadingHTTPServer((host, port), _handler(service, int(max_mb * 2**20), log))
    except OSError as e:
        raise MelafastError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") from None


def serve(run, host: str = "127.0.0.1", port: int = 7860, max_mb: float = MAX_MB, device=None,
          precision: str | None = None, log: Callable = print):
    """Serve the page for `run` until interrupted."""
    server = make_server(run, host, port, max_mb, device, precision, log)
    h, p = server.server_address[:2]
    log(f"serving {run} on http://{h}:{p}/ (Ctrl+C stops it)"
        + ("" if host in ("127.0.0.1", "localhost", "::1") else "; reachable from other machines: no authentication"))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
