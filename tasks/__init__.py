"""The stage tasks: thin Prefect tasks over skyferry's plain functions, one module per stage."""

from __future__ import annotations
