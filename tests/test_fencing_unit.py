"""The node form of executor subjects and the fences against forged executor events."""

from __future__ import annotations

import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    JobError,
    JobFailed,
    JobLost,
    JobReady,
    JobSpec,
    JobStarted,
    JobSucceeded,
    NoopRuntime,
)
from jobmesh.contract.messages.v1.deadletter import DEADLETTER_CODES
from jobmesh.errors import InvalidSpec
from jobmesh.executor.node import MachineFacts, resolve_node_id
from jobmesh.runtime.fencing import BINDING_PATIENCE, FORGED, binding_fence, subject_fence
from jobmesh.runtime.outcomes import Reject, Retry
from jobmesh.runtime.settings import Settings


def succeeded(node_id: str) -> JobSucceeded:
    return JobSucceeded(
        job_id="j1",
        partition=3,
        attempt=1,
        node_id=node_id,
        exit_code=0,
        output_tail="",
        submitted_at=1.0,
        started_at=2.0,
        at=3.0,
    )


# --- subjects ------------------------------------------------------------------------------
def test_the_node_form_ends_with_the_node_token():
    assert subjects.node_event(3, subjects.SUCCEEDED, "gpu-1") == "jobmesh.v1.job.3.succeeded.gpu-1"
    assert subjects.node_of_event("jobmesh.v1.job.3.succeeded.gpu-1") == ("succeeded", "gpu-1")
    assert subjects.node_of_event("jobmesh.v1.job.3.succeeded") is None
    # More tokens than six: the rest is the "node", which no one-token node id equals.
    assert subjects.node_of_event("jobmesh.v1.job.3.started.a.b") == ("started", "a.b")


def test_job_events_gives_both_forms_of_an_executor_kind_only():
    assert subjects.job_events("*", (subjects.READY, subjects.SUCCEEDED)) == [
        "jobmesh.v1.job.*.ready",
        "jobmesh.v1.job.*.succeeded",
        "jobmesh.v1.job.*.succeeded.*",
    ]
    every = subjects.job_events(0, subjects.TERMINAL_KINDS)
    for kind in subjects.TERMINAL_KINDS:
        assert subjects.job_event(0, kind) in every
        assert (subjects.node_event(0, kind, "*") in every) == (kind in subjects.EXECUTOR_KINDS)
    assert len(every) == len(set(every))


def test_forged_is_a_dead_letter_code():
    assert FORGED in DEADLETTER_CODES


@pytest.mark.parametrize("bad", ["a.b", "a*", "a>", "*", ">", "a b", ""])
def test_a_node_id_that_is_not_one_subject_token_is_refused(bad):
    facts = MachineFacts(hostname="h", cpu_count=1, memory_mb=1000, arch="x86_64")
    if not bad:
        # Unset means the host name, sanitised into one token.
        assert resolve_node_id(Settings(node_id=bad), facts) == "h"
        return
    with pytest.raises(InvalidSpec, match="JOBMESH_NODE_ID"):
        resolve_node_id(Settings(node_id=bad), facts)


# --- the subject fence ---------------------------------------------------------------------
def test_the_partition_form_and_a_matching_node_pass():
    assert subject_fence("jobmesh.v1.job.3.succeeded", succeeded("")) is None  # a mapped step's
    assert subject_fence("jobmesh.v1.job.3.succeeded", succeeded("a")) is None  # an older executor's
    assert subject_fence(subjects.node_event(3, subjects.SUCCEEDED, "a"), succeeded("a")) is None
    started = JobStarted(job_id="j1", partition=3, attempt=1, node_id="a", at=1.0)
    assert subject_fence(subjects.node_event(3, subjects.STARTED, "a"), started) is None
    failed = JobFailed(
        job_id="j1",
        partition=3,
        attempt=1,
        node_id="a",
        exit_code=1,
        error=JobError(code="exit_nonzero", message="exit 1"),
        output_tail="",
        submitted_at=1.0,
        started_at=2.0,
        at=3.0,
    )
    assert subject_fence(subjects.node_event(3, subjects.FAILED, "a"), failed) is None
    lost = JobLost(job_id="j1", partition=3, attempt=1, node_id="a", at=1.0)
    assert subject_fence(subjects.node_event(3, subjects.LOST, "a"), lost) is None


def test_a_body_naming_another_node_is_forged():
    subject = subjects.node_event(3, subjects.SUCCEEDED, "b")
    refused = subject_fence(subject, succeeded("a"))
    assert isinstance(refused, Reject) and refused.code == FORGED
    assert "node_id 'a' is not the subject's node 'b'" in refused.reason and subject in refused.reason
    refused = subject_fence(subject, succeeded(""))
    assert isinstance(refused, Reject) and refused.code == FORGED


def test_a_kind_executors_do_not_publish_is_forged_on_the_node_form():
    ready = JobReady(
        job_id="j1",
        partition=3,
        attempt=1,
        spec=JobSpec(runtime=NoopRuntime()),
        candidates=["b"],
        submitted_at=1.0,
        ready_at=2.0,
    )
    refused = subject_fence("jobmesh.v1.job.3.ready.b", ready)
    assert isinstance(refused, Reject) and refused.code == FORGED and "'ready' is not an event kind" in refused.reason


def test_a_body_of_another_kind_is_forged():
    lost = JobLost(job_id="j1", partition=3, attempt=1, node_id="b", at=1.0)
    refused = subject_fence(subjects.node_event(3, subjects.SUCCEEDED, "b"), lost)
    assert (
        isinstance(refused, Reject) and refused.code == FORGED and "a JobLost on a succeeded subject" in refused.reason
    )


# --- the binding fence ---------------------------------------------------------------------
def test_no_binding_or_the_same_node_passes():
    assert binding_fence("s", "a", "", 1, "held by") is None
    assert binding_fence("s", "a", "a", 9, "held by") is None


def test_another_nodes_binding_waits_a_little_then_is_forged():
    for deliveries in range(1, BINDING_PATIENCE):
        waiting = binding_fence("s", "b", "a", deliveries, "attempt j:1 is held by")
        assert isinstance(waiting, Retry) and waiting.delay > 0
    refused = binding_fence("jobmesh.v1.job.0.succeeded.b", "b", "a", BINDING_PATIENCE, "attempt j:1 is held by")
    assert isinstance(refused, Reject) and refused.code == FORGED
    assert refused.reason == (
        "jobmesh.v1.job.0.succeeded.b: attempt j:1 is held by node 'a', not 'b'; "
        "a node reports only for attempts bound to it"
    )
