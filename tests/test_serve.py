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

    from melafast.operating import save_operating_point
    from melafast.serve import make_server

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
        assert json.loads(r.read())["operating_point"]["operating_point"] == "sens90"


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
        page.set_input_files("#files", str(image))
        result = page.wait_for_selector(".result .prob", timeout=60_000)
        shown = float(result.text_content())
        text = page.text_content(".result")
        images = page.evaluate("() => Array.from(document.querySelectorAll('.result img')).map(i => i.naturalWidth)")
        before = list(problems)  # the refused upload below makes the browser log its 415
        page.set_input_files("#files", str(tmp_path / "p.csv"))  # not an image: said on the page
        page.wait_for_selector(".result .error", timeout=60_000)
        error = page.text_content(".result .error")
        browser.close()
    assert shown == pytest.approx(want["pred"], abs=5e-5)  # the page shows 4 decimals of predict's figure
    assert f"{int(want['votes'])} of 2 models" in text and ("not melanoma" in text) == (want["decision"] == 0)
    assert images == [224, 224] and before == [] and "2 fold models (folds 0, 1), TTA x2" in text
    assert "p.csv" in error and "not an image" in error
