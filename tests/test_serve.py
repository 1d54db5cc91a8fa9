"""`melafast serve`: the page in a real headless browser gives the probability `melafast predict` gives; the JSON
endpoint; uploads it refuses."""

import json
import threading
import urllib.error
import urllib.request

import pandas as pd
import pytest
from test_browser import CHROMIUM
from typer.testing import CliRunner

from melafast.cli import app


@pytest.fixture(scope="module")
def server(make_run, tmp_path_factory):
    "The TTA x2 shared run, with an operating point, served on a free port (0.2 MB upload limit)."
    import shutil

    from melafast.evaluate.operating import save_operating_point
    from melafast.deploy.serve import make_server

    run = shutil.copytree(make_run(tta=2), tmp_path_factory.mktemp("serve") / "run")
    save_operating_point(run, "sens90", n_boot=20)
    srv = make_server(run, port=0, max_mb=0.2, log=lambda m: None)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield run, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _predicted(run, image, tmp_path, meta=None) -> pd.Series:
    "What `melafast predict` writes for one image."
    args = ["predict", "--run", str(run), "--images", str(image.parent), "--workers", "0", "--out", str(tmp_path / "p.csv")]
    if meta is not None:
        meta.to_csv(tmp_path / "meta.csv", index=False)
        args += ["--meta", str(tmp_path / "meta.csv")]
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    return pd.read_csv(tmp_path / "p.csv").set_index("image_name").loc[image.stem]


def test_the_json_endpoint_gives_predicts_figures(server, sample_dir, tmp_path):
    run, url = server
    image = sample_dir / "jpeg" / "test" / "SYNTH_000070.jpg"
    files = sorted(p for p in run.rglob("*"))
    status, got = _post(f"{url}/api/predict?name={image.stem}&sex=male&age=60&site=torso", image.read_bytes())
    assert status == 200, got
    meta = pd.DataFrame([{"image_name": image.stem, "sex": "male", "age_approx": 60,
                          "anatom_site_general_challenge": "torso"}])
    want = _predicted(run, image, tmp_path, meta)
    assert got["pred"] == pytest.approx(want["pred"], abs=1e-5)
    assert got["decision"] == want["decision"] and got["votes"] == want["votes"] and got["models"] == 2
    assert got["tta"] == 2 and got["cam_png"].startswith("data:image/png;base64,")
    assert sorted(p for p in run.rglob("*")) == files  # the upload was never written anywhere near the run
    with urllib.request.urlopen(f"{url}/api/info") as r:
        info = json.loads(r.read())["operating_point"]
    assert info["operating_point"] == "sens90" and "out-of-fold images" in info["chosen_on"]
    assert set(info["paths"]) == {"as given", "no metadata"} and info["crossfit"]["sensitivity"]["lo"] is not None
    with urllib.request.urlopen(url) as r:
        page = r.read().decode()
    assert "the operating point in force: sensitivity &gt;= 90%" in page and "One threshold serves both" in page
    # the fold models' spread, the metadata used, and the probability at a stated prevalence, as predict gives them
    assert min(got["per_model"]) == pytest.approx(want["pred_min"], abs=1e-5)
    assert max(got["per_model"]) == pytest.approx(want["pred_max"], abs=1e-5)
    assert got["metadata"] == {"sex": "male", "age_approx": 60.0, "anatom_site_general_challenge": "torso"}
    assert got["unseen"] == {}
    status, low = _post(f"{url}/api/predict?name={image.stem}&sex=male&age=60&site=torso&prevalence=0.02",
                        image.read_bytes())
    assert status == 200 and low["prevalence"] == 0.02
    from melafast.metrics import at_prevalence

    assert low["pred_at_prevalence"] == pytest.approx(float(at_prevalence(got["pred"], got["trained_prevalence"], 0.02)))
    assert low["pred_at_prevalence"] < got["pred"] and low["pred"] == pytest.approx(got["pred"])  # pred stays
    # a site the run never saw is not accepted silently: echoed as unseen
    status, leg = _post(f"{url}/api/predict?name={image.stem}&site=leg", image.read_bytes())
    assert status == 200 and leg["unseen"] == {"anatom_site_general_challenge": ["leg"]}
    status, bad = _post(f"{url}/api/predict?name=x&prevalence=lots", image.read_bytes())
    assert status == 400 and "prevalence" in bad["error"]


def test_uploads_it_refuses(server, sample_dir):
    _, url = server
    status, got = _post(f"{url}/api/predict?name=notes.txt", b"these are notes, not an image")
    assert status == 415 and "not an image" in got["error"]
    status, got = _post(f"{url}/api/predict?name=big.jpg", b"\xff" * 300_000)
    assert status == 413 and "up to 0 MB" not in got["error"] and "--max-mb" in got["error"]
    image = (sample_dir / "jpeg" / "test" / "SYNTH_000070.jpg").read_bytes()
    status, got = _post(f"{url}/api/predict?name=x&age=300", image)
    assert status == 400 and "age" in got["error"]
    status, got = _post(f"{url}/api/predict", b"")
    assert status == 400 and "no image" in got["error"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to test the page in: `bash .ci/browser` installs it")
def test_the_page_in_a_browser_shows_predicts_probability(server, sample_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    run, url = server
    image = sample_dir / "jpeg" / "test" / "SYNTH_000071.jpg"
    want = _predicted(run, image, tmp_path)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        page.select_option("select[data-field=sex]", "female")
        page.fill("#prevalence", "0.02")
        page.set_input_files("#files", str(image))
        result = page.wait_for_selector(".result .prob", timeout=60_000)
        shown = float(result.text_content())
        text = page.text_content(".result")
        prevalence_text = page.text_content(".result .at-prevalence")
        spread_text = page.text_content(".result .spread")
        used_text = page.text_content(".result .metadata")
        images = page.evaluate("() => Array.from(document.querySelectorAll('.result img')).map(i => i.naturalWidth)")
        before = list(problems)  # the refused upload below makes the browser log its 415
        page.set_input_files("#files", str(tmp_path / "p.csv"))  # not an image: said on the page
        page.wait_for_selector(".result .error", timeout=60_000)
        error = page.text_content(".result .error")
        browser.close()
    want_female = _predicted(run, image, tmp_path, pd.DataFrame([{"image_name": image.stem, "sex": "female"}]))
    assert shown == pytest.approx(want_female["pred"], abs=5e-5)  # the page shows 4 decimals of predict's figure
    assert "where 2.0% of lesions are melanomas" in prevalence_text
    assert spread_text.startswith("fold models: ") and len(spread_text.split(" / ")) == 2
    assert f"{want_female['pred_min']:.3f}" in spread_text and f"{want_female['pred_max']:.3f}" in spread_text
    assert used_text == "metadata used: age approx not given; sex female; anatom site general challenge not given"
    want = want_female
    assert f"{int(want['votes'])} of 2 models" in text and ("not melanoma" in text) == (want["decision"] == 0)
    assert images == [224, 224] and before == [] and "2 fold models (folds 0, 1), TTA x2" in text
    assert "p.csv" in error and "not an image" in error


# ------------------------------------------------------------------------------------------------------------------
# Hostile requests, each from a raw socket: every one gets an HTTP answer


def _raw(url: str, request: bytes, timeout: float = 30) -> tuple[int, str]:
    "Send `request` as it is on a new connection; (status, body) of the answer (status 0: none came)."
    import socket

    host, port = urllib.request.urlparse(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # nothing more comes: a server waiting for more must still answer
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def _post_raw(url, headers: dict, body: bytes = b"", path="/api/predict?name=x") -> tuple[int, str]:
    port = urllib.request.urlparse(url).port
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return _raw(url, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _png_header(width: int, height: int) -> bytes:
    "A PNG that declares `width` x `height` pixels in a few dozen bytes (its pixels are never sent)."
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_lengths_get_an_answer(server):
    _, url = server
    for headers, code, said in (({"Content-Length": "-1"}, 400, "negative"),
                                ({"Content-Length": "12abc"}, 400, "must be a number"),
                                ({}, 411, "no Content-Length"),
                                ({"Transfer-Encoding": "chunked"}, 411, "chunked"),
                                ({"Content-Length": "5000"}, 400, "ended after 3 of the 5000 bytes")):
        status, body = _post_raw(url, headers, b"abc")
        assert status == code and said in json.loads(body)["error"], (headers, status, body)
    status, body = _post_raw(url, {"Content-Length": str(10**12)})  # far over --max-mb: answered before any read
    assert status == 413 and "--max-mb" in json.loads(body)["error"]


def test_huge_images_are_refused_from_their_header(server):
    _, url = server
    for w, h in ((15000, 13000), (12000, 12000)):  # over Pillow's bomb limit, and just under it
        status, body = _post_raw(url, {"Content-Length": str(len(_png_header(w, h)))}, _png_header(w, h))
        error = json.loads(body)["error"]
        assert status == 413 and "--max-megapixels" in error and "40 megapixels" in error, (w, h, body)


def test_other_hosts_and_origins_are_refused(server, sample_dir):
    _, url = server
    port = urllib.request.urlparse(url).port
    status, body = _raw(url, f"GET /api/info HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode())
    assert status == 403 and "evil.example" in json.loads(body)["error"]  # DNS rebinding: another name, our address
    image = (sample_dir / "jpeg" / "test" / "SYNTH_000070.jpg").read_bytes()
    status, body = _post_raw(url, {"Content-Length": len(image), "Origin": "http://evil.example"}, image)
    assert status == 403 and "evil.example" in json.loads(body)["error"]  # a page elsewhere posting here
    status, body = _post_raw(url, {"Content-Length": len(image), "Origin": f"http://localhost:{port}"}, image)
    assert status == 200 and 0 <= json.loads(body)["pred"] <= 1  # its own page
    status, _ = _raw(url, f"GET /nowhere HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
    assert status == 404
    with urllib.request.urlopen(url) as r:  # the page cannot be framed by another site
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"


def test_an_unexpected_failure_is_a_500_and_the_server_goes_on(server, sample_dir, monkeypatch):
    from melafast.deploy.service import Service

    _, url = server
    image = (sample_dir / "jpeg" / "test" / "SYNTH_000070.jpg").read_bytes()
    monkeypatch.setattr(Service, "predict", lambda *a, **k: 1 / 0)
    status, got = _post(f"{url}/api/predict?name=x", image)
    assert status == 500 and "ZeroDivisionError" in got["error"]
    monkeypatch.undo()
    status, got = _post(f"{url}/api/predict?name=x", image)
    assert status == 200


def test_unknown_fields_and_the_runs_own_form(server):
    _, url = server
    with urllib.request.urlopen(f"{url}/api/info") as r:
        fields = {f["name"]: f for f in json.loads(r.read())["fields"]}
    assert set(fields) == {"sex", "age_approx", "anatom_site_general_challenge"}
    assert fields["sex"]["choices"] == ["female", "male"] and fields["age_approx"]["kind"] == "number"
    with urllib.request.urlopen(url) as r:
        page = r.read().decode()
    assert all(f'data-field="{name}"' in page for name in fields)
    status, got = _post(f"{url}/api/predict?name=x&colour=red", b"\xff\xd8")
    assert status == 400 and "no field 'colour'" in got["error"] and "age_approx" in got["error"]


def test_the_upload_is_decoded_once_for_every_fold_model(server, sample_dir, monkeypatch):
    import melafast.onnx

    run, _ = server
    calls = []
    real = melafast.onnx.open_image_array
    monkeypatch.setattr(melafast.onnx, "open_image_array", lambda *a: calls.append(a[1]) or real(*a))
    from melafast.deploy.service import Service

    service = Service(run, device="cpu")
    service.predict((sample_dir / "jpeg" / "test" / "SYNTH_000070.jpg").read_bytes(), "x")
    assert len(service.models) == 2 and calls == [32]


def test_a_stalled_client_times_out_and_the_threads_are_bounded(make_run):
    "One request at a time: a client that sends half its headers is dropped after the read timeout, and the request "
    "waiting behind it is answered then."
    import socket
    import time

    from melafast.deploy.serve import make_server

    srv = make_server(make_run(tta=2), port=0, log=lambda m: None, threads=1, timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.")  # and nothing more
        time.sleep(0.2)
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=30) as r:
            assert r.status == 200
        waited = time.perf_counter() - t0
        assert 0.5 < waited < 10, waited  # it waited for the stalled client's timeout, not forever
        stalled.close()
    finally:
        srv.shutdown()
        srv.server_close()
