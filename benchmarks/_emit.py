"""What every benchmark script ends with: its result as one JSON object on stdout, and in --out when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(res: dict, out=None) -> dict:
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return res


def mean_sd(values, digits: int = 3, sign: str = "") -> str:
    "'mean ± sample sd' of `values` (sd 'nan' from one value), each to `digits` places; `sign='+'` signs the mean."
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():{sign}.{digits}f} ± {sd:.{digits}f}"


def write_table(out, lines: list, data) -> None:
    "A seeded benchmark's end: its Markdown table printed and written to `out`.md, its rows (`data`) to `out`.json."
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines))
