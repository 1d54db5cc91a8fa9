"""Load on `melafast serve`: concurrent clients posting images for a while, with hostile requests mixed in.

Starts `melafast serve --run RUN` in its own process on a free loopback port, then --clients threads each post the
images of --images (round robin) to /api/predict for --seconds. With --hostile K every K-th request of a client is
one the server must refuse (a negative Content-Length, a page of another origin, an image whose header declares
15000 x 13000 pixels). Every request must get an HTTP answer: `lost` counts those that got none (a dropped
connection, a timeout). Each image's probability under load is checked against the one it got alone, before the
load: `max_diff_under_load`. Prints one JSON object: requests, answered, lost, answers by status, predictions per
second, and the p50/p95/p99 latency of the predictions.

    python benchmarks/serve_load.py --run runs/sample --images data/sample/jpeg/test --clients 8 --seconds 60
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from _emit import emit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bomb() -> bytes:
    "A PNG whose header declares 15000 x 13000 pixels, in a few dozen bytes."
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 13000, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _request(port: int, body: bytes, name: str, headers=None, timeout: float = 120.0):
    "(status, JSON answer) of one POST, or (None, why) when no answer came."
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", f"/api/predict?name={name}")
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


HOSTILE = {  # what the server must answer, and with which status
    "negative length": (lambda img: (img, {"Content-Length": "-1"}), 400),
    "other origin": (lambda img: (img, {"Origin": "http://evil.example"}), 403),
    "pixel bomb": (lambda img: (_bomb(), {}), 413),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished run folder")
    p.add_argument("--images", required=True, help="folder of images to post")
    p.add_argument("--limit", type=int, default=16, help="post the first N images of the folder")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=8, help="the server's --threads")
    p.add_argument("--hostile", type=int, default=10, help="every K-th request of a client is hostile (0: none)")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)

    files = sorted(f for f in Path(a.images).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.limit]
    images = [(f.stem, f.read_bytes()) for f in files]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "melafast", "serve", "--run", str(a.run), "--port", str(port),
                               "--threads", str(a.threads)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in server.stdout:  # wait until it listens
            if "serving" in line:
                break
        else:
            raise SystemExit(f"melafast serve did not start (exit code {server.wait()})")
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # drain its log
        alone = {}
        for name, body in images:  # each image's probability with nothing else running
            status, got = _request(port, body, name)
            if status != 200:
                raise SystemExit(f"{name}: the server answered {status}: {got}")
            alone[name] = got["pred"]

        records, lock = [], threading.Lock()
        deadline = time.perf_counter() + a.seconds

        def client(i: int):
            n = 0
            while time.perf_counter() < deadline:
                name, body = images[(i + n) % len(images)]
                hostile = a.hostile and n % a.hostile == a.hostile - 1
                kind, want, headers = "predict", 200, None
                if hostile:
                    kind = list(HOSTILE)[(n // a.hostile) % len(HOSTILE)]
                    make, want = HOSTILE[kind]
                    body, headers = make(body)
                t0 = time.perf_counter()
                status, got = _request(port, body, name, headers)
                rec = dict(kind=kind, want=want, status=status, seconds=time.perf_counter() - t0,
                           diff=abs(got["pred"] - alone[name]) if status == 200 else None)
                with lock:
                    records.append(rec)
                n += 1

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    import numpy as np

    preds = [r for r in records if r["kind"] == "predict" and r["status"] == 200]
    lat = np.array([r["seconds"] for r in preds]) * 1000
    by_status = {}
    for r in records:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    res = dict(run=str(a.run), images=len(images), clients=a.clients, server_threads=a.threads, seconds=round(wall, 1),
               requests=len(records), answered=sum(r["status"] is not None for r in records),
               lost=sum(r["status"] is None for r in records),
               wrong_status=sum(r["status"] is not None and r["status"] != r["want"] for r in records),
               hostile=sum(r["kind"] != "predict" for r in records), by_status=by_status,
               predictions=len(preds), predictions_per_s=round(len(preds) / wall, 2),
               latency_ms=dict(p50=round(float(np.percentile(lat, 50)), 1), p95=round(float(np.percentile(lat, 95)), 1),
                               p99=round(float(np.percentile(lat, 99)), 1)) if len(lat) else None,
               max_diff_under_load=max((r["diff"] for r in preds), default=None),
               cpu=f"{os.cpu_count()} cores")
    return emit(res, a.out)


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["lost"] == 0 and res["wrong_status"] == 0 else 1)
