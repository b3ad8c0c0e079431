"""A workflow step's inputs through the whole cluster, with real processes: job A keeps its
result (``keep_result``), and job B, a step whose upstream ``a`` is A, echoes
``${steps.a.result.path}``. B is submitted once A has succeeded: the dependency itself is
the scheduler's business, not this test's."""

from __future__ import annotations

import json

import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, ProcessRuntime, StepRef, Submission, UpstreamRef
from tests.cluster_fixtures import E2E_NODE_ENV

pytestmark = pytest.mark.integration

A_RESULT = {"path": "/data/part-0.csv", "rows": [3, 1, 2], "title": "a b"}


def step_b(upstream: str, *argv: str, step: str = "b") -> JobSpec:
    return JobSpec(
        runtime=ProcessRuntime(argv=list(argv)),
        keep_result=True,
        step=StepRef(workflow_id="w1", step=step, upstream={"a": UpstreamRef(job_id=upstream)}),
    )


async def test_a_step_reads_its_upstreams_kept_result(nats_server, make_cluster) -> None:
    await make_cluster(env=E2E_NODE_ENV, name="steps")
    client = await Client.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        write = f"printf '%s' '{json.dumps(A_RESULT)}' > \"$JOBMESH_RESULT_PATH\""
        a_spec = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", write]), keep_result=True)
        [a] = (await client.submit([Submission(spec=a_spec)])).job_ids
        a_view = await client.wait(a, timeout=60)
        assert a_view.state == "succeeded", a_view
        # Small, so inline as ever; and kept by job besides, before the success was reported.
        assert json.loads(a_view.attempts[-1].result) == A_RESULT
        store = await nc.jetstream().object_store(subjects.OBJ_RESULTS)
        kept = await store.get(subjects.step_result_key(a))
        assert json.loads(kept.data) == A_RESULT

        argv = ["sh", "-c", 'echo "$1|$2|$3|$ROWS|$(cat)"', "sh", "${steps.a.result.path}", "${steps.a.result.rows}"]
        good = JobSpec(
            runtime=ProcessRuntime(
                argv=[*argv, "at ${steps.a.result.title}"], env={"ROWS": "${steps.a.result.rows.0}"}
            ),
            stdin="${steps.a.result.title}",
            keep_result=True,
            step=StepRef(workflow_id="w1", step="b", upstream={"a": UpstreamRef(job_id=a)}),
        )
        bad = step_b(a, "echo", "${steps.a.result.missing.0}", step="c")
        stranger = step_b(a, "echo", "${steps.z.result}", step="d")
        ids = (await client.submit([Submission(spec=s) for s in (good, bad, stranger)])).job_ids
        b_view, bad_view, stranger_view = [await client.wait(job, timeout=60) for job in ids]

        assert b_view.state == "succeeded", b_view
        assert b_view.attempts[-1].output_tail == "/data/part-0.csv|[3,1,2]|at a b|3|a b\n"
        # B keeps its own (empty) result for the steps after it.
        assert (await store.get(subjects.step_result_key(ids[0]))).data == b"null"

        for view, placeholder, why in (
            (bad_view, "${steps.a.result.missing.0}", "the result of step 'a' has no missing.0"),
            (stranger_view, "${steps.z.result}", "step 'z' is not an upstream of this step (upstream: a)"),
        ):
            assert view.state == "failed" and view.final, view
            error = view.attempts[-1].error
            assert error is not None and error.code == "input_invalid"
            assert error.message == f"runtime.argv[1]: {placeholder}: {why}"
            assert len(view.attempts) == 1  # input_invalid is not retried

        # A no-op step keeps null too, so a step after it finds its result.
        [noop] = (await client.submit([Submission(spec=JobSpec(runtime=NoopRuntime(), keep_result=True))])).job_ids
        assert (await client.wait(noop, timeout=60)).state == "succeeded"
        assert (await store.get(subjects.step_result_key(noop))).data == b"null"
    finally:
        await nc.close()
        await client.close()
