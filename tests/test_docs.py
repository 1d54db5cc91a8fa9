"""The documentation: a short README whose links resolve, a generated reference that matches the code, and a site
that builds (mkdocs --strict) with every page present, every internal link and anchor resolving, and the tutorials
rendered with their outputs."""

import html.parser
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_reads_in_five_minutes_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [u for u in links if not urlparse(u).scheme]
    assert len(local) >= 15  # the docs pages and the notebooks
    missing = [u for u in local if not (ROOT / unquote(u.split("#")[0])).exists()]
    assert missing == []


def test_the_generated_reference_matches_the_code():
    gen = _gen_reference()
    for path, text in ((gen.CLI, gen.cli_reference()), (gen.SETTINGS, gen.settings_reference()),
                       (gen.API, gen.api_reference())):
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python docs/gen_reference.py"


def test_the_reference_names_every_command_option_and_setting():
    from melafast.cli import app
    from melafast.config import TrainConfig, settings_of

    gen = _gen_reference()
    cli = gen.cli_reference()
    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"## `melafast {name}`" in cli
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert f"`{opt}" in cli, (name, opt)
    settings = gen.settings_reference()
    assert all(f"| `{name}` |" in settings for name in settings_of(TrainConfig))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs site needs the [docs] extra (in [dev])")
    pytest.importorskip("mkdocs_jupyter", reason="the docs site needs the [docs] extra (in [dev])")
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out / "site")], cwd=out, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "site"


def test_every_page_of_the_docs_builds(site):
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix(".html").as_posix()
                   for p in (ROOT / "docs").rglob("*.md"))
    pages += [f"tutorials/{p.stem}.html" for p in sorted((ROOT / "nbs").glob("*.ipynb"))]
    missing = [p for p in pages if not (site / p).is_file()]
    assert missing == []
    assert len(pages) >= 20


def test_every_internal_link_of_the_site_resolves(site):
    parsed = {}
    for page in site.rglob("*.html"):
        p = _Links()
        p.feed(page.read_text(errors="replace"))
        parsed[page] = p
    broken = []
    for page, p in parsed.items():
        for link in p.links:
            url = urlparse(link)
            if url.scheme or link.startswith("//") or link.startswith("data:") or link.startswith("mailto:"):
                continue
            base = site if url.path.startswith("/") else page.parent  # the 404 page links from the site's root
            target = (base / unquote(url.path).lstrip("/")).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html" and target in parsed and url.fragment not in parsed[target].ids:
                broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert broken == []


def test_the_tutorials_are_rendered_with_their_outputs(site):
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        texts = ["".join(o["text"]).strip() for c in nb["cells"] if c["cell_type"] == "code"
                 for o in c.get("outputs", []) if o.get("output_type") == "stream" and "".join(o["text"]).strip()]
        page = (site / "tutorials" / f"{nb_path.stem}.html").read_text()
        assert texts, f"{nb_path.name} holds no printed output"
        first = texts[0].splitlines()[0].strip()
        assert first in html.unescape(page), (nb_path.name, first)
