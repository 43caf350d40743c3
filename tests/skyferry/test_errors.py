"""A stage's failure: one boundary, retried as its cause is, and intact across processes."""

from __future__ import annotations

import pickle

from skyferry.errors import QuorumNotMetError, SchemaError, StageError, is_transient


def _failed(cause: Exception) -> StageError:
    try:
        try:
            raise cause
        except Exception as exc:
            raise StageError(str(exc), stage="distribution", batch_id="b1", dataset="ds",
                             chunk=7) from exc
    except StageError as error:
        return error


def test_a_stage_error_names_the_stage_batch_and_chunk_and_keeps_its_cause() -> None:
    error = _failed(QuorumNotMetError("2 of 3 needed", chunk=7, verified=1, quorum=2))
    assert str(error) == "stage distribution failed for ds/batch=b1 chunk 7: 2 of 3 needed"
    assert isinstance(error.__cause__, QuorumNotMetError)


def test_a_stage_error_is_retried_exactly_when_its_cause_is() -> None:
    assert is_transient(_failed(QuorumNotMetError("q", chunk=1, verified=0, quorum=2)))
    assert not is_transient(_failed(SchemaError("no column f0", source="schema.yaml")))


def test_a_stage_error_survives_pickling_from_a_worker_process() -> None:
    error = _failed(TimeoutError("node n1 timed out"))
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), str(back), back.stage, back.batch_id, back.dataset, back.chunk) == (
        StageError, str(error), "distribution", "b1", "ds", 7)
