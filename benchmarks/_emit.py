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
