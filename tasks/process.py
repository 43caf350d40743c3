"""Process task: decode, validate, transform and encode one chunk."""

from __future__ import annotations

from skyferry.run import chunk as chunk_stages
from skyferry.run.chunk import Ingested, Processed
from skyferry.run.context import BatchRun
from tasks._common import io_task, run_stage_task

__all__ = ["process_chunk"]


@io_task("process-chunk")
def process_chunk(ingested: Ingested, run: BatchRun) -> Processed:
    return run_stage_task("processing", chunk_stages.process, ingested, run)
