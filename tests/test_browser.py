"""The report, compare, audit and external-evaluation pages in a real headless browser (Debian's chromium, driven by playwright): each
loads with no console error, every image decodes, and every link of its navigation lands on a section.

`.ci/browser` installs chromium for CI; where none can be installed these tests skip and say so. Set
MELAFAST_CHROMIUM to use another Chromium binary.
"""

import os
import shutil

import pytest
from conftest import needs_ham
from typer.testing import CliRunner

from melafast.cli import app


def _chromium():
    for name in (os.environ.get("MELAFAST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium to test the pages in: `bash .ci/browser` installs it "
                                                "(apt-get install chromium), or set MELAFAST_CHROMIUM"),
    pytest.mark.xdist_group("browser"),  # one browser for the three pages
]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                              "--disable-background-networking"])
        yield b
        b.close()


def open_page(browser, path) -> dict:
    "Load the page as a user would (file://) and collect what the browser says about it."
    page = browser.new_page()
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    images = page.evaluate("""() => Promise.all(Array.from(document.images).map(img => img.decode().then(
        () => ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight}),
        () => ({alt: img.alt, width: 0, height: 0}))))""")
    links = page.evaluate("""() => Array.from(document.querySelectorAll('nav a')).map(a => {
        const id = a.getAttribute('href').slice(1), target = document.getElementById(id);
        return {id: id, found: !!target, heading: target ? target.querySelector('h2').textContent : null}; })""")
    # following a link scrolls its section into view
    jumped = None
    if links and links[-1]["found"]:
        page.click(f"nav a[href='#{links[-1]['id']}']")
        jumped = page.evaluate(f"""() => {{ const top = document.getElementById('{links[-1]['id']}')
            .getBoundingClientRect().top; return location.hash === '#{links[-1]['id']}' && top >= -1
            && top < window.innerHeight && window.scrollY > 0; }}""")
    page.close()
    return dict(problems=problems, images=images, links=links, requests=requests, jumped=jumped)


def _check(got, n_images, sections):
    assert got["problems"] == []
    assert len(got["images"]) == n_images
    assert all(i["width"] > 50 and i["height"] > 50 for i in got["images"]), got["images"]  # each one decoded
    assert [link["id"] for link in got["links"]] == sections and all(link["found"] for link in got["links"])
    assert all(u.startswith(("file:", "data:")) for u in got["requests"])  # nothing fetched from a network
    assert got["jumped"] is True  # following the last link scrolled its section into view


def test_report_page_in_a_browser(browser, tiny_run, tmp_path):
    from melafast.evaluate.report import SECTIONS

    run = shutil.copytree(tiny_run, tmp_path / "run")
    res = CliRunner().invoke(app, ["report", "--run", str(run), "--workers", "0", "--bootstrap", "100"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = open_page(browser, run / "report.html")
    _check(got, 9, list(SECTIONS))
    assert [link["heading"] for link in got["links"]] == list(SECTIONS.values())


def test_compare_and_audit_pages_in_a_browser(browser, tiny_run, make_run, tmp_path):
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(app, ["compare", str(tiny_run), str(make_run(tta=2)), "--out", str(out), "--bootstrap",
                                   "100"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = open_page(browser, out)
    assert got["problems"] == [] and len(got["links"]) >= 3
    _check(got, len(got["images"]), [link["id"] for link in got["links"]])
    assert len(got["images"]) >= 2
    res = CliRunner().invoke(app, ["audit", "--run", str(tiny_run), "--out", str(tmp_path / "audit.html"),
                                   "--bootstrap", "100", "--workers", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _check(open_page(browser, tmp_path / "audit.html"), 2, ["audit"])


def test_a_broken_page_is_caught(browser, tmp_path):
    "The checks can fail: a page with an undecodable image, a script error and a dangling link."
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><nav><a href="#gone">gone</a></nav>'
                    '<img src="data:image/png;base64,iVBORw0KGgo=" alt="bad"><script>undefinedThing()</script>'
                    "</body></html>")
    got = open_page(browser, page)
    assert any("undefinedThing" in p for p in got["problems"])
    assert got["images"] == [{"alt": "bad", "width": 0, "height": 0}]
    assert got["links"] == [{"id": "gone", "found": False, "heading": None}]


def test_the_reports_operating_point_in_force_in_a_browser(browser, tiny_run, tmp_path):
    "What a clinician reads about the point: where it was chosen, its rule, both input paths; one row per point."
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert CliRunner().invoke(app, ["operating-point", "--run", str(run), "--bootstrap", "50"],
                              catch_exceptions=False).exit_code == 0
    res = CliRunner().invoke(app, ["report", "--run", str(run), "--workers", "0", "--bootstrap", "50", "--errors",
                                   "0", "--no-importance", "--no-audit"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    page = browser.new_page()
    page.goto((run / "report.html").as_uri())
    got = page.evaluate("""() => {
        const h = document.getElementById('point-in-force');
        const box = h.getBoundingClientRect();
        const table = document.querySelector('#curves table.t');
        return {section: h.closest('section').id, heading: h.textContent, visible: box.width > 0 && box.height > 0,
                text: h.parentElement.textContent,
                rows: Array.from(table.querySelectorAll('tbody tr')).map(r => r.cells[0].textContent)};
    }""")
    page.close()
    assert got["section"] == "curves" and got["visible"] and "sensitivity >= 90%" in got["heading"]
    assert "out-of-fold images" in got["text"] and "melanoma when at least half of the fold models" in got["text"]
    assert "One threshold serves both input paths" in got["text"]
    assert got["rows"] == ["sens90", "sens95", "spec90", "spec95"]  # one row per operating point


@needs_ham
def test_the_external_evaluation_page_in_a_browser(browser, ham_evaluation):
    "melafast evaluate on real HAM10000 images of another clinic: every image decodes, every link lands, no error."
    from melafast.evaluate.external_page import SECTIONS

    out, _ = ham_evaluation
    got = open_page(browser, out / "evaluation.html")
    # roc, calibration, subgroups, and the error galleries (missed melanomas, false alarms, other malignant)
    _check(got, len(got["images"]), list(SECTIONS))
    assert len(got["images"]) >= 5
    assert [link["heading"] for link in got["links"]] == list(SECTIONS.values())
