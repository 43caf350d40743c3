"""Validate decoded rows against a dataset's schema: convert each column exactly, check
the schema's rules, and turn every row that fails into a reject with its reason, its source
and its row. No row is dropped silently."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skyferry.errors import SchemaError
from skyferry.models import ChunkPart
from skyferry.process.convert import convert_column
from skyferry.process.schema import Schema

__all__ = ["apply_constraints", "coerce", "reject"]


def reject(part: ChunkPart, row: int | None, reason: str, text: str | None) -> dict[str, Any]:
    return {"source": part.source, "offset": part.start, "row": row, "reason": reason,
            "text": text}


def coerce(table: pa.Table, schema: Schema, part: ChunkPart, rejects: list[dict[str, Any]],
            raw: pa.Table | None = None) -> tuple[pa.Table, np.ndarray]:
    """Convert ``table`` to the schema exactly (skyferry/process/convert.py); a row with a
    value that does not convert becomes a reject with its reason. Returns the kept rows and
    their positions in ``table``."""
    missing = [c for c in schema.columns if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"{part.source} lacks schema columns {missing}; it has {table.column_names}",
            source=part.source,
        )
    reasons: dict[int, str] = {}
    columns = dict(zip(table.column_names, table.columns, strict=True))
    for name, col in schema.columns.items():
        columns[name], bad = convert_column(table.column(name), col.arrow_type, name, col.type)
        for i, why in bad.items():
            reasons.setdefault(i, why)
    typed = pa.table({n: columns[n] for n in table.column_names})
    rows = np.arange(table.num_rows)
    if reasons:
        texts = raw if raw is not None else table
        for i in sorted(reasons):
            row = {n: texts.column(n)[i].as_py() for n in texts.column_names}
            rejects.append(reject(part, i + 1, reasons[i], json.dumps(row, default=str)))
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(reasons)] = False
        typed, rows = typed.filter(pa.array(keep)), rows[keep]
    return typed, rows


def apply_constraints(table: pa.Table, schema: Schema, part: ChunkPart,
                       rejects: list[dict[str, Any]], rows: np.ndarray) -> pa.Table:
    """Rows that break a schema rule become rejects; ``rows`` holds each row's position in
    its block as decoded, which a reject names."""
    bad = None
    reason_for: dict[int, str] = {}
    for reason, mask in schema.constraint_masks(table):
        if not pc.any(mask).as_py():
            continue
        for i in pc.indices_nonzero(mask).to_pylist():
            reason_for.setdefault(i, reason)
        bad = mask if bad is None else pc.or_(bad, mask)
    if bad is None:
        return table
    for i in sorted(reason_for):
        row = {n: table.column(n)[i].as_py() for n in table.column_names}
        rejects.append(reject(part, int(rows[i]) + 1, reason_for[i],
                               json.dumps(row, default=str)))
    return table.filter(pc.invert(bad))
