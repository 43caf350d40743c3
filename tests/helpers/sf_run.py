"""Run the pipeline in a child process: ``python -m tests.helpers.sf_run '<config JSON>'``."""

from __future__ import annotations

import sys

from flows.pipeline import run_pipeline
from skyferry.config import PipelineConfig

if __name__ == "__main__":
    result = run_pipeline(PipelineConfig.model_validate_json(sys.argv[1]))
    sys.stdout.write(result.model_dump_json() + "\n")
