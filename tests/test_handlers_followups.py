"""Follow-up jobs from a handler (``ctx.submit``) through a real trigger on a real nats-server:
the pool's Followups submits them, the trigger accepts them durably (a resubmit with the same
key is a duplicate) or refuses them naming the field, and a pool without a connection says so."""

from __future__ import annotations

import msgspec
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, Submission, SubmitReply, SubmitRequest
from jobmesh.executor.followups import Followups
from jobmesh.executor.handlerpool import HandlerPool
from tests.test_handlers import run_job

HANDLERS = '''
"""A handler that starts follow-up jobs, as an agent that finds new evidence would."""
import msgspec
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, RetryPolicy
from jobmesh.errors import JobmeshError
from jobmesh.sdk import Context, handler


class Evidence(msgspec.Struct):
    leads: int
    retry_on: str = ""


class Started(msgspec.Struct):
    job_ids: list[str] = []
    code: str = ""
    field: str = ""
    message: str = ""


@handler("investigate")
async def investigate(evidence: Evidence, ctx: Context) -> Started:
    retry = RetryPolicy(retry_on=[evidence.retry_on]) if evidence.retry_on else RetryPolicy()
    ids = []
    try:
        for lead in range(evidence.leads):
            spec = JobSpec(runtime=NoopRuntime(), queue="analysis", name=f"lead {lead}", retry=retry)
            ids.append(await ctx.submit_async(spec) if lead % 2 else ctx.submit(spec))
    except JobmeshError as exc:
        return Started(job_ids=ids, code=exc.code, field=exc.field or "", message=str(exc))
    return Started(job_ids=ids)
'''


@pytest.fixture(scope="module")
async def trigger(make_module_cluster):
    return await make_module_cluster(["trigger"], name="followups")


@pytest.fixture(scope="module")
def module_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("followup_handlers") / "followup_handlers.py"
    path.write_text(HANDLERS)
    return path


async def test_a_handlers_follow_ups_are_accepted_by_the_trigger_once(trigger, nc, module_path, tmp_path):
    pool = HandlerPool([str(module_path)], workers=1, submit=Followups(nc))
    await pool.start()
    try:
        ran = await run_job(pool, tmp_path / "a", "investigate", {"leads": 2})
    finally:
        await pool.stop()
    assert ran.code is None, ran.outcome
    # The job's n-th follow-up has the key <job id>.followup.<n>, so its id is known ahead.
    assert ran.result is not None and ran.result["code"] == ""
    assert ran.result["job_ids"] == [job_id_for("job1.followup.1"), job_id_for("job1.followup.2")]
    # Durably accepted: submitting the first again under its key is a duplicate of it.
    again = SubmitRequest(
        jobs=[Submission(spec=JobSpec(runtime=NoopRuntime(), queue="analysis"), idempotency_key="job1.followup.1")]
    )
    reply = msgspec.json.decode(
        (await nc.request(subjects.API_SUBMIT, encode(again), timeout=10)).data, type=SubmitReply
    )
    assert reply.job_ids == [job_id_for("job1.followup.1")] and reply.duplicates == [True]


async def test_a_follow_up_the_trigger_refuses_raises_in_the_handler_naming_the_field(
    trigger, nc, module_path, tmp_path
):
    pool = HandlerPool([str(module_path)], workers=1, submit=Followups(nc))
    await pool.start()
    try:
        ran = await run_job(pool, tmp_path / "a", "investigate", {"leads": 1, "retry_on": "no_such_code"})
    finally:
        await pool.stop()
    assert ran.code is None, ran.outcome  # the handler caught the refusal and returned it
    assert ran.result is not None
    assert ran.result["code"] == "invalid_spec" and ran.result["job_ids"] == []
    assert ran.result["field"] == "jobs[0].spec.retry.retry_on[0]"
    assert "unknown failure code 'no_such_code'" in ran.result["message"]


async def test_follow_ups_without_a_trigger_or_a_connection_are_refused_as_unavailable(nc, module_path, tmp_path):
    no_trigger_subject = Followups(_Renamed(nc), timeout=2)
    with pytest.raises(Exception) as caught:
        await no_trigger_subject(JobSpec(runtime=NoopRuntime()), "k")
    assert getattr(caught.value, "code", "") == "unavailable"
    pool = HandlerPool([str(module_path)], workers=1)  # no submit given
    await pool.start()
    try:
        ran = await run_job(pool, tmp_path / "a", "investigate", {"leads": 1})
    finally:
        await pool.stop()
    assert ran.result is not None and ran.result["code"] == "unavailable"
    assert "cannot submit jobs" in ran.result["message"]


class _Renamed:
    """A connection whose submit requests go to a subject nobody answers."""

    def __init__(self, nc) -> None:
        self._nc = nc

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5):
        return await self._nc.request(subject + ".nobody", payload, timeout=timeout)
