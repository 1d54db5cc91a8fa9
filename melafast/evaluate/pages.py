"""The HTML of every page (report, compare, audit sections): one style, self-contained (images embedded), escaped."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["image", "table", "para", "note", "page", "headline_table", "interval", "figure"]

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}img{max-width:100%}
table.t{border-collapse:collapse;font-size:.85em;margin:.6em 0}table.t td,table.t th{padding:.2em .6em;
border-bottom:1px solid #eee;text-align:right}nav a{margin-right:1em}.note{color:#a33}"""


def image(path: Path) -> str:
    "A PNG embedded in the page."
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def table(df: pd.DataFrame, digits: int = 4) -> str:
    "A table, floats to `digits` places, holes blank."
    return df.to_html(index=False, border=0, escape=True, na_rep="",
                      float_format=lambda v: f"{v:.{digits}f}", classes="t")


def para(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def note(text: str) -> str:
    "A paragraph that warns."
    return f'<p class="note">{html.escape(text)}</p>'


def figure(value, digits: int = 4) -> str:
    "A value to `digits` places, or 'n/a' where it could not be computed (e.g. a by-patient figure without patients)."
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def interval(lo, hi, digits: int = 4) -> str:
    "'lo to hi', or '' without an interval."
    return "" if lo is None or hi is None or np.isnan(lo) or np.isnan(hi) else f"{lo:.{digits}f} to {hi:.{digits}f}"


def headline_table(headline: pd.DataFrame, level: float = 0.95) -> str:
    "An evaluation's headline measures: figure, value, interval, what it means."
    rows = pd.DataFrame({"figure": headline["figure"],
                         "value": [figure(v, d) for v, d in zip(headline["value"], headline["digits"])],
                         f"{level:.0%} interval": [interval(lo, hi, d) for lo, hi, d in
                                                   zip(headline["lo"], headline["hi"], headline["digits"])],
                         "what it says": headline["about"]})
    return table(rows)


def page(title: str, sections: dict, names: dict) -> str:
    "One self-contained page: `title`, a link to each section, and the sections (id -> HTML), headed by `names`."
    nav = " ".join(f'<a href="#{k}">{html.escape(names[k])}</a>' for k in sections)
    body = "\n".join(f'<section id="{k}"><h2>{html.escape(names[k])}</h2>\n{v}\n</section>' for k, v in sections.items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")
