"""Where a benchmark writes its result: under `$OUT` when it is set (the folder whose files come back
from the GPU machine), else where asked (default benchmarks/results/); never over an earlier file."""

from __future__ import annotations

import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(asked: str | None, stem: str) -> Path:
    """The file to write: `asked`'s name (default `<stem>-<date>-<time>.json`) under `$OUT` if set,
    with a run id added when a file of that name is already there."""
    out_dir = os.environ.get("OUT")
    name = Path(asked).name if asked else f"{stem}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    path = Path(out_dir) / name if out_dir else Path(asked) if asked else RESULTS / name
    if path.exists():  # a second run of the same day (or the same --out) keeps the first's figures
        path = path.with_name(f"{path.stem}-{time.strftime('%H%M%S')}-{os.getpid()}{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
