"""Ingest tasks: list what is new in the source, and plan the batch."""

from __future__ import annotations

from skyferry.ingest.listing import Listing
from skyferry.models import SourceFile
from skyferry.run import batch
from skyferry.run.context import BatchRun, RunSetup
from tasks._common import io_task

__all__ = ["list_new_files", "plan_batch"]


@io_task("list-new-files")
def list_new_files(setup: RunSetup) -> Listing:
    return batch.new_source_files(setup)


@io_task("plan-batch")
def plan_batch(setup: RunSetup, files: list[SourceFile]) -> BatchRun:
    return batch.plan_batch(setup, files)
