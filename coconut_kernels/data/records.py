"""Loading and validation of the official COCONUT data format.

A data file is a JSON list of records ``{"question": str, "steps": [str, ...], "answer": str, ...}``
(extra keys, e.g. ProsQA's graph, are kept). Everything downstream (tokenizers, stages, the generator's
output, evaluation) works on the validated list this module returns.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CoconutError
from ..validation import check_int

__all__ = ["load_records", "validate_records", "save_records"]

# Optional ProsQA graph fields and the type each must have when present.
_GRAPH_FIELDS = {"idx_to_symbol": list, "edges": list, "root": int, "target": int, "neg_target": int}


def _check_record(i: int, rec: Any) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"record {i}: expected a JSON object, got {type(rec).__name__}")
    for field in ("question", "steps", "answer"):
        if field not in rec:
            raise ValueError(f"record {i}: missing field {field!r}")
    for field in ("question", "answer"):
        if not isinstance(rec[field], str):
            raise ValueError(f"record {i}: field {field!r} must be a string, got {type(rec[field]).__name__}")
    steps = rec["steps"]
    if not isinstance(steps, list):
        raise ValueError(f"record {i}: field 'steps' must be a list of strings, got {type(steps).__name__}")
    for j, s in enumerate(steps):
        if not isinstance(s, str):
            raise ValueError(f"record {i}: field 'steps' item {j} must be a string, got {type(s).__name__}")
    for field, kind in _GRAPH_FIELDS.items():
        # bool is an int subclass; a boolean node index is a data error, not an index
        if field in rec and (not isinstance(rec[field], kind) or isinstance(rec[field], bool)):
            raise ValueError(f"record {i}: field {field!r} must be {kind.__name__}, got {type(rec[field]).__name__}")


def validate_records(records: Any) -> list[dict]:
    """Check ``records`` (a list of dicts in the official format); returns it. Raises ValueError naming the
    record index and the field on the first problem found."""
    if not isinstance(records, list):
        raise ValueError(f"records: expected a JSON list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        _check_record(i, rec)
    return records


def load_records(path: str | Path, max_records: int | None = None) -> list[dict]:
    """Load and validate a JSON data file in the official format (optionally only its first max_records >= 1
    records); a ValueError names the file, then the record and field."""
    if max_records is not None:
        check_int(max_records, "max_records", low=1)
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise CoconutError(f"{path}: not valid JSON ({e})") from None
    if max_records is not None and isinstance(records, list):
        records = records[:max_records]
    try:
        return validate_records(records)
    except ValueError as e:
        raise CoconutError(f"{path}: {e}") from None


def save_records(records: list[dict], path: str | Path) -> None:
    """Write records in the official format (validated first, so a bad record never reaches disk)."""
    validate_records(records)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
