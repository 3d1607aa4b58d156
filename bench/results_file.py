"""Where every benchmark writes its JSON: one helper, so they all do it the same way."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str, results: dict) -> None:
    """Write ``results`` as indented JSON to ``out`` (parents created) and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")
