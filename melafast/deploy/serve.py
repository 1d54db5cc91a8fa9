"""`melafast serve`: a local web page to try a run, and a JSON endpoint for the same prediction.

Drop one or more dermoscopic images on the page, with any of the patient fields the run learned (its own columns and
categories); each gets the melanoma probability (the mean of the run's fold models over its TTA views, exactly as
`melafast predict`: the same metadata path, `inference.inputs`), the decision at the run's operating point when it
has one, and the Grad-CAM map beside the image. Uploads stay in memory: the server writes nothing.

What it holds against (a careful local model server): it binds to 127.0.0.1 unless told otherwise; on a loopback
address it answers only requests whose Host (and Origin, when a browser sends one) is its own, so a web page the user
opens elsewhere cannot reach it through DNS rebinding; a request needs a numeric Content-Length within --max-mb; the
image's pixel count is read from its header and checked against --max-megapixels before it is decoded; the upload is
decoded once for every fold model of an input size; reads time out; at most --threads requests are handled at once
(the others wait in the listen queue); every request gets an HTTP answer, an unexpected failure a 500 with one line.

    POST /api/predict?sex=female&age_approx=55&anatom_site_general_challenge=torso   body: the image's bytes -> JSON
    GET  /api/info                                                     -> the run, its models, TTA, its fields
"""

from __future__ import annotations

import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlparse

from ..errors import DataError, MelafastError
from ..record import figure_in_words
from .service import MAX_MB, MAX_MEGAPIXELS, READ_TIMEOUT, THREADS, Service, TooLarge

__all__ = ["make_server", "serve"]

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
{fields}
<label title="the share of lesions that are melanomas where the images come from">prevalence
<input id="prevalence" type="number" min="0.001" max="0.999" step="any" placeholder="{trained}"></label>
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
  const q = new URLSearchParams({{name: file.name}});
  for (const f of document.querySelectorAll('[data-field]')) if (f.value !== '') q.append(f.dataset.field, f.value);
  const prev = document.getElementById('prevalence').value;
  if (prev !== '') q.append('prevalence', prev);
  try {{
    const r = await fetch('/api/predict?' + q, {{method: 'POST', body: file}});
    const j = await r.json();
    if (!r.ok) {{ box.innerHTML = '<span class="error">' + esc(file.name + ': ' + j.error) + '</span>'; return; }}
    let decision = '';
    if (j.decision !== undefined) {{
      decision = '<div class="decision">decision at ' + esc(j.operating_point) + ': <b>' +
        (j.decision ? 'melanoma' : 'not melanoma') + '</b> (' + (j.votes !== undefined ?
        j.votes + ' of ' + j.models + ' models at or above ' + j.threshold.toFixed(4) :
        'fold mean ' + j.pred.toFixed(4) + (j.decision ? ' at or above ' : ' below ') + j.threshold.toFixed(4)) +
        ')</div>';
    }}
    const scale = j.trained_prevalence ? ' (where ' + (100 * j.trained_prevalence).toFixed(1) +
      '% of lesions are melanomas, as in training)' : '';
    const atPrev = j.pred_at_prevalence !== undefined ? '<div class="at-prevalence">where ' +
      (100 * j.prevalence).toFixed(1) + '% of lesions are melanomas: <b>' + j.pred_at_prevalence.toFixed(4) +
      '</b></div>' : '';
    const calibrated = j.pred_calibrated !== undefined ? '<div class="calibrated">recalibrated probability: <b>' +
      j.pred_calibrated.toFixed(4) + '</b> (the recalibration of this run; the ranking and the decision are those of ' +
      'the probability above)</div>' : '';
    const spread = '<div class="spread">fold models: ' + j.per_model.map(p => p.toFixed(3)).join(' / ') + '</div>';
    const used = Object.entries(j.metadata).map(([k, v]) => esc(k.replace(/_/g, ' ') + ' ' +
      (v === null ? 'not given' : v)) +
      ((j.unseen[k] || []).includes(String(v)) ? ' <span class="error">(never seen in training: scored as an ' +
      'unknown category, not as a missing field)</span>' : '')).join('; ');
    box.innerHTML = '<img alt="image" src="' + j.image_png + '"><img alt="Grad-CAM" src="' + j.cam_png + '">' +
      '<div><div>' + esc(j.image_name) + '</div><div>melanoma probability <span class="prob">' + j.pred.toFixed(4) +
      '</span>' + scale + '</div>' + calibrated + atPrev + spread + decision + '<div class="metadata">metadata used: ' +
      (used || 'none (the image path alone)') + '</div><div class="note">mean of ' + j.models +
      ' fold models (folds ' + j.folds.join(', ') + '), TTA x' + j.tta +
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

def _figures(point) -> str:
    "The point's cross-fitted figures in words, both input paths when it has them."
    both = point.paths_in_words()
    if both:
        return ". " + both.rstrip(".")
    cf = point.crossfit
    if not cf or cf.get("sensitivity") is None:
        return " (not cross-fitted)"
    return (f"; cross-fitted: sensitivity {figure_in_words(cf['sensitivity'])}, specificity "
            f"{figure_in_words(cf['specificity'])}")


def _field_html(f: dict) -> str:
    "One form control for a field the run learned: its categories to choose from, or a number."
    name = html.escape(f["name"])
    label = html.escape(f["name"].replace("_", " "))
    if f["kind"] == "category":
        options = "".join(f"<option>{html.escape(c)}</option>" for c in f["choices"])
        return (f'<label>{label} <select data-field="{name}"><option value="">unknown</option>{options}</select>'
                "</label>")
    bounds = ' min="0" max="120" step="1"' if f["name"] == "age_approx" else ' step="any"'
    return f'<label>{label} <input data-field="{name}" type="number"{bounds}></label>'


class _Refused(Exception):
    "A request answered with an error before it reaches the model: (HTTP status, message)."


def _refuse(code: int, message: str):
    "Work that refuses the request."
    def work():
        raise _Refused(code, message)
    return work


def _allowed_hosts(host: str, port: int) -> set | None:
    """The Host header values a server bound to `host` answers (None: any, for a server bound to every or a public
    interface, which says it has no authentication): on a loopback address only its own names, the defence against
    DNS rebinding."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}


def _handler(service: Service, max_bytes: int, log: Callable, hosts: set | None, timeout: float):
    info = service.info()
    point = service.point
    about = (f"{len(service.models)} fold model(s), TTA x{service.tta}"
             + (f"; the operating point in force: {point.goal}, threshold {point.threshold:.4f}, chosen on "
                f"{point.chosen_on}; {point.rule}" + _figures(point) if point
                else "; no operating point saved (`melafast operating-point` or `melafast calibrate`)") + ".")
    fields = "\n".join(_field_html(f) for f in service.fields) or "<p>This run uses no patient metadata.</p>"
    trained = "" if service.trained_prevalence is None else f"{service.trained_prevalence:.3f} (training)"
    page = _PAGE.format(run=html.escape(info["run"]), about=html.escape(about), fields=fields,
                        trained=html.escape(trained)).encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "melafast"
        protocol_version = "HTTP/1.0"  # one request per connection: a slow client holds one thread, not a pool

        def setup(self):
            self.timeout = timeout  # a client that stops sending is dropped after this many seconds
            super().setup()

        def _send(self, code: int, body: bytes, kind: str):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")  # no other site frames the page (clickjacking)
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict):
            self._send(code, json.dumps(obj).encode("utf-8"), "application/json")

        def _check_origin(self):
            "Refuse requests for another host name (DNS rebinding) and cross-site posts (a page elsewhere)."
            if hosts is None:
                return
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in hosts:
                raise _Refused(403, f"this server answers requests for {sorted(hosts)[0]} only, not Host {host!r}")
            origin = self.headers.get("Origin")
            if origin is not None and urlparse(origin.strip().lower()).netloc not in hosts:
                raise _Refused(403, f"requests from pages of {origin!r} are refused: open the page this server serves")

        def _body(self) -> bytes:
            "The request body, after checking its declared length."
            if self.headers.get("Transfer-Encoding"):
                raise _Refused(411, "send the image with a Content-Length header (chunked uploads are not taken)")
            length = self.headers.get("Content-Length")
            if length is None or not length.strip():
                raise _Refused(411, "no Content-Length header: POST the image file's bytes with their length")
            try:
                size = int(length.strip(), 10)
            except ValueError:
                raise _Refused(400, f"Content-Length must be a number of bytes, got {length!r}") from None
            if size < 0:
                raise _Refused(400, f"Content-Length must not be negative, got {size}")
            if size > max_bytes:
                raise _Refused(413, f"the upload is {size / 2**20:.1f} MB; this server takes up to "
                                    f"{max_bytes / 2**20:.3g} MB (--max-mb)")
            if size == 0:
                raise _Refused(400, "no image in the request: POST the image file's bytes")
            data = self.rfile.read(size)
            if len(data) < size:
                raise _Refused(400, f"the upload ended after {len(data)} of the {size} bytes it announced")
            return data

        def _answer(self, work):
            "Run `work` and answer: its JSON, or one error line with the status that fits."
            try:
                self._check_origin()
                code, body = 200, work()
            except _Refused as e:
                code, body = e.args[0], {"error": e.args[1]}
                self.close_connection = True
            except TooLarge as e:
                code, body = 413, {"error": str(e)}
            except DataError as e:
                code, body = (415 if "not an image" in str(e) else 400), {"error": str(e)}
            except MelafastError as e:
                code, body = 400, {"error": str(e)}
            except (TimeoutError, ConnectionError):
                self.close_connection = True
                return  # the client went away or stalled: nobody to answer
            except Exception as e:  # noqa: BLE001 - a server answers every request, even one that broke it
                log(f"error on {self.command} {self.path}: {type(e).__name__}: {e}")
                code, body = 500, {"error": f"the server failed on this request ({type(e).__name__}); see its log"}
            if isinstance(body, bytes):
                return self._send(code, body, "text/html; charset=utf-8")
            if body is None:
                return self._send(204, b"", "image/x-icon")
            self._json(code, body)

        def do_GET(self):
            path = urlparse(self.path).path
            pages = {"/": lambda: page, "/api/info": lambda: info, "/favicon.ico": lambda: None}
            self._answer(pages.get(path) or _refuse(404, f"no page {path}"))

        def do_POST(self):
            url = urlparse(self.path)

            def work():
                if url.path != "/api/predict":
                    raise _Refused(404, f"no endpoint {url.path}")
                data = self._body()
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                name = q.pop("name", "upload")
                prevalence = q.pop("prevalence", "")
                try:
                    prevalence = float(prevalence) if prevalence != "" else None
                except ValueError:
                    raise _Refused(400, f"prevalence must be a number between 0 and 1, got {prevalence!r}") from None
                return service.predict(data, name, prevalence=prevalence, **q)

            self._answer(work)

        def log_message(self, fmt, *args):
            log(f"{self.address_string()} {fmt % args}")

    return Handler


class _BoundedServer(ThreadingHTTPServer):
    "A threading server that handles at most `threads` requests at once; the others wait to be accepted."

    daemon_threads = True

    def __init__(self, address, handler, threads: int):
        self.slots = threading.BoundedSemaphore(threads)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(run, host: str = "127.0.0.1", port: int = 7860, max_mb: float = MAX_MB, device=None,
                precision: str | None = None, log: Callable = print, max_megapixels: float = MAX_MEGAPIXELS,
                threads: int = THREADS, timeout: float = READ_TIMEOUT) -> ThreadingHTTPServer:
    """The server for `run` (not yet serving: call `.serve_forever()`); port 0 takes a free one."""
    for name, value in (("--max-mb", max_mb), ("--max-megapixels", max_megapixels), ("--threads", threads),
                        ("timeout", timeout)):
        if not value > 0:
            raise MelafastError(f"{name} must be positive, got {value}")
    service = Service(run, device=device, precision=precision, max_megapixels=max_megapixels)
    try:
        server = _BoundedServer((host, port), None, int(threads))
    except OSError as e:
        raise MelafastError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") from None
    server.RequestHandlerClass = _handler(service, int(max_mb * 2**20), log,
                                          _allowed_hosts(host, server.server_address[1]), timeout)
    return server


def serve(run, host: str = "127.0.0.1", port: int = 7860, max_mb: float = MAX_MB, device=None,
          precision: str | None = None, log: Callable = print, max_megapixels: float = MAX_MEGAPIXELS,
          threads: int = THREADS):
    """Serve the page for `run` until interrupted."""
    server = make_server(run, host, port, max_mb, device, precision, log, max_megapixels, threads)
    h, p = server.server_address[:2]
    log(f"serving {run} on http://{h}:{p}/ (Ctrl+C stops it)"
        + ("" if host in ("127.0.0.1", "localhost", "::1") else "; reachable from other machines: no authentication, "
           "and any Host name is answered"))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
