"""Store stage task: commit the batch's manifest atomically."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from skyferry.manifest import Manifest
from skyferry.models import StoredChunk
from skyferry.pipeline import RunContext, commit_fn
from tasks._retry import retry_delays, retry_transient

__all__ = ["commit_manifest"]

_DELAYS = retry_delays()


@task(name="commit-manifest", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def commit_manifest(ctx: RunContext, chunks: list[StoredChunk]) -> tuple[Manifest, str]:
    started = time.perf_counter()
    manifest, key = commit_fn(ctx, chunks)
    ctx.recorder.record("storage", nbytes=len(manifest.to_json()),
                        seconds=time.perf_counter() - started)
    return manifest, key
