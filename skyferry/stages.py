"""The stages of a run, named once.

``STAGES`` are DESIGN's four, each measured (bytes, seconds, retries). ``setup`` is what a
run does before its first stage: opening the catalog, probing the nodes, taking the
dataset's lease and loading a planned batch; a failure there names no stage's work.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["STAGES", "Stage"]

Stage = Literal["setup", "ingestion", "processing", "distribution", "storage"]

STAGES: tuple[Stage, ...] = ("ingestion", "processing", "distribution", "storage")
