"""What an attempt reports is masked: its tail and its error's message (a container engine
or a handler's exception can quote a secret's value)."""

from __future__ import annotations

from jobmesh.executor.attempts import _masked
from jobmesh.executor.masking import Masker
from jobmesh.executor.outcomes import Outcome, failed_outcome


def test_the_tail_and_the_error_message_of_an_outcome_are_masked() -> None:
    masker = Masker({"API_TOKEN": "tok-4f9a2c71"})
    outcome = failed_outcome(
        "container_failed",
        "engine said: bad value tok-4f9a2c71 for --env",
        exit_code=125,
        output_tail="x tok-4f9a2c71\n",
    )
    masked = _masked(outcome, masker)
    assert masked.error is not None and masked.error.code == "container_failed"
    assert masked.error.message == "engine said: bad value *** for --env"
    assert masked.output_tail == "x ***\n" and masked.exit_code == 125


def test_a_success_keeps_its_result_and_loses_only_the_secret() -> None:
    masker = Masker(["tok-4f9a2c71"])
    outcome = Outcome(0, None, "ok tok-4f9a2c71\n", result="r", result_bytes=1)
    masked = _masked(outcome, masker)
    assert (masked.error, masked.output_tail, masked.result, masked.result_bytes) == (None, "ok ***\n", "r", 1)
