"""Run the pipeline in a child process: ``python sf_run.py '<PipelineConfig JSON>'``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from flows.pipeline import run_pipeline  # noqa: E402
from skyferry.config import PipelineConfig  # noqa: E402

if __name__ == "__main__":
    result = run_pipeline(PipelineConfig.model_validate_json(sys.argv[1]))
    sys.stdout.write(result.model_dump_json() + "\n")
