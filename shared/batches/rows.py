"""Rows as the model card sends them (`input_data`), and as JSONL or CSV objects in the bucket."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from shared.errors import Code, Problem

ALIASES = {"mask": "mask_image"}  # the card's field name wins: a job body accepts both


def row_dicts(columns: list[str], data: list[dict[str, Any] | list[Any]]) -> list[dict[str, Any]]:
    """The card's rows as dicts: a list of objects, or Azure's `split` lists aligned with `columns`."""
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, list):
            if len(row) != len(columns):
                raise Problem(
                    422, Code.validation_error, f"input_data.data[{i}] has {len(row)} values for {len(columns)} columns",
                    f"input_data.data.{i}",
                )  # fmt: skip
            row = dict(zip(columns, row, strict=True))
        rows.append(row)
    return rows


def job_fields(row: dict[str, Any], parameters: dict[str, Any] | None = None, **forced: Any) -> dict[str, Any]:
    """A row as the fields of a job: `parameters` under the row's own values (empty cells of a CSV
    row do not count), then `forced` over both (`/score` answers PNG whatever a row says)."""
    own = {ALIASES.get(k, k): v for k, v in row.items() if v is not None and (v != "" or k == "prompt")}
    fields = {"output_format": "png", **(parameters or {}), **own, **forced}
    return fields


def row_job_id(batch_id: str, index: int) -> str:
    """Deterministic per row (a retried row is never a second job), time-ordered like every job id."""
    return batch_id[:12] + hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:20]


Parsed = tuple[dict[str, Any] | Problem, int, list[str] | None]


def parse(lines: Iterable[bytes], fmt: str, offset: int, columns: list[str] | None) -> Iterator[Parsed]:
    """(row or why it is not one, byte offset after it, CSV columns when just read) from `offset` on.

    A CSV's header yields `({}, offset, columns)`: nothing to submit, but the columns to remember."""
    if fmt == "jsonl":
        pos = offset
        for line in lines:
            pos += len(line)
            text = line.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                yield row, pos, None
            except ValueError as exc:
                yield Problem(400, Code.invalid_row, f"not a JSON object: {str(exc)[:100]}"), pos, None
        return
    consumed = [0]

    def counted() -> Iterator[str]:
        for line in lines:
            consumed[0] += len(line)
            yield line.decode("utf-8", errors="replace")

    for record in csv.reader(counted()):
        if columns is None:
            columns = [c.strip() for c in record]
            yield {}, offset + consumed[0], columns
            continue
        if not any(record):
            continue
        if len(record) != len(columns):
            yield (
                Problem(400, Code.invalid_row, f"{len(record)} values for {len(columns)} columns"),
                offset + consumed[0],
                None,
            )
            continue
        yield dict(zip(columns, record, strict=True)), offset + consumed[0], None
