"""Dataset schemas: column types and constraints, loaded from YAML.

Example (``skyferry/schemas/demo.yaml``)::

    columns:
      id:       {type: int64, nullable: false}
      f0:       {type: float64, min: -1000, max: 1000}
      category: {type: string, allowed: [a, b, c]}
      label:    {type: int64, allowed: [0, 1]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from skyferry.config import describe_validation_error
from skyferry.errors import SchemaError

__all__ = ["Column", "Schema", "load_schema"]

ColumnType = Literal["int64", "float64", "string", "bool", "timestamp", "decimal"]
TimeUnit = Literal["s", "ms", "us", "ns"]
_ARROW = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
}


class Column(BaseModel):
    """One column's type and rules.

    >>> Column(type="timestamp").arrow_type
    TimestampType(timestamp[us, tz=UTC])
    >>> Column(type="decimal", precision=12, scale=2).arrow_type
    Decimal128Type(decimal128(12, 2))
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ColumnType
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    allowed: list[Any] | None = None
    unit: TimeUnit | None = Field(
        default=None, description="timestamp: the finest fraction of a second kept (us by "
        "default; ns keeps nanoseconds, within the years 1677-2262)")
    precision: int | None = Field(default=None, ge=1, le=76,
                                  description="decimal: significant digits")
    scale: int | None = Field(default=None, ge=0, description="decimal: digits after the point")

    @model_validator(mode="after")
    def _fits_type(self) -> Column:
        if self.unit is not None and self.type != "timestamp":
            raise ValueError(f"`unit` is for timestamp columns, not {self.type}")
        if self.type == "decimal":
            if self.precision is None or self.scale is None:
                raise ValueError("a decimal column needs `precision` and `scale`")
            if self.scale > self.precision:
                raise ValueError(f"scale {self.scale} exceeds precision {self.precision}")
        elif self.precision is not None or self.scale is not None:
            raise ValueError(f"`precision` and `scale` are for decimal columns, not {self.type}")
        return self

    @property
    def arrow_type(self) -> pa.DataType:
        if self.type == "timestamp":
            return pa.timestamp(self.unit or "us", tz="UTC")
        if self.type == "decimal":
            assert self.precision is not None and self.scale is not None
            if self.precision <= 38:
                return pa.decimal128(self.precision, self.scale)
            return pa.decimal256(self.precision, self.scale)
        return _ARROW[self.type]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: dict[str, Column] = Field(..., min_length=1)

    def arrow_types(self) -> dict[str, pa.DataType]:
        return {name: col.arrow_type for name, col in self.columns.items()}

    def constraint_masks(self, table: pa.Table) -> list[tuple[str, pa.ChunkedArray]]:
        """``(reason, mask)`` pairs; a True in a mask rejects that row."""
        masks = []
        for name, col in self.columns.items():
            values = table.column(name)
            if not col.nullable:
                masks.append((f"column {name!r} is null", pc.is_null(values)))
            if col.min is not None:
                masks.append(
                    (f"column {name!r} is below {col.min}",
                     pc.fill_null(pc.less(values, col.min), False))
                )
            if col.max is not None:
                masks.append(
                    (f"column {name!r} is above {col.max}",
                     pc.fill_null(pc.greater(values, col.max), False))
                )
            if col.allowed is not None:
                allowed = pa.array(col.allowed, type=col.arrow_type)
                masks.append(
                    (f"column {name!r} is not one of {col.allowed}",
                     pc.fill_null(pc.invert(pc.is_in(values, value_set=allowed)), False))
                )
        return masks


def load_schema(path: str | Path) -> Schema:
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SchemaError(f"cannot read schema {where}: {exc}", source=where) from exc
    try:
        return Schema.model_validate(raw)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise SchemaError(f"invalid schema {where}: {problems}", source=where) from None
