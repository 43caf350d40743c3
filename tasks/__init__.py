"""Thin Prefect tasks over skyferry's plain functions: `move-chunk` (one chunk through
ingest, process and distribute), and the parent's steps (list, plan, probe, journal, commit,
verify, repair)."""

from __future__ import annotations
