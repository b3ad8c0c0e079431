"""The completions consumer's life against a real nats-server: made for the first completion
rule, kept while anyone pulls from it, deleted once idle after the last rule went, and also
when a replica that starts without completion rules finds one left behind."""

from __future__ import annotations

import msgspec
import nats.js.errors

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import TriggerRecord, TriggerRule
from jobmesh.runtime.pull import PullConsumer
from jobmesh.runtime.service import Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.trigger.completions import DURABLE, CompletionConsumer, CompletionHandler
from jobmesh.trigger.ruleset import RuleSet
from tests.helpers import eventually

RULE = {"name": "after", "source": {"kind": "completion", "name": "x"}, "job": {"runtime": {"kind": "noop"}}}


def record() -> bytes:
    return msgspec.json.encode(TriggerRecord(rule=msgspec.convert(RULE, TriggerRule), version=1))


async def replica(url: str, name: str) -> tuple[Runtime, RuleSet, CompletionConsumer]:
    rt = Runtime(Settings(nats_url=url, service="trigger", instance=name))
    await rt.connect()
    rules = RuleSet(None)
    rules.ready.set()
    consumer = CompletionConsumer(
        rt,
        rules,
        CompletionHandler(rules, None, rt.dead_letter),
        256 * 1024,
        delete_grace=0.5,
        pull_renew=0.5,  # type: ignore[arg-type]
    )
    rt.spawn(consumer.run(), "completions")
    return rt, rules, consumer


async def shut(rt: Runtime) -> None:
    """Stop a replica the way a kill would: its tasks end, its connection closes, no grace."""
    await rt.remove_consumer(DURABLE)
    for task in rt._tasks:
        task.cancel()
    await rt.nc.close()


async def exists(js) -> bool:
    try:
        await js.consumer_info(subjects.STREAM_JOBS, DURABLE)
        return True
    except nats.js.errors.NotFoundError:
        return False


async def gone(js) -> bool:
    return not await exists(js)


async def test_the_durable_lives_while_a_rule_or_a_puller_does(nats_server):
    rt, rules, _ = await replica(nats_server.url, "a")
    js = rt.js
    try:
        rules.apply("after", record())
        await eventually(lambda: exists(js), what="the durable for the first completion rule")
        info = await js.consumer_info(subjects.STREAM_JOBS, DURABLE)
        assert (
            str(getattr(info.config.deliver_policy, "value", info.config.deliver_policy)) == "new"
        )  # a new rule fires for no job that ended before it

        # Another replica, whose view still holds a completion rule, pulls from it: it stays.
        other = PullConsumer(rt.nc, subjects.STREAM_JOBS, DURABLE, 10)
        await other.start()
        rules.apply("after", None)
        await eventually(lambda: _pulled_by_one(js), what="this replica to stop pulling")
        for _ in range(3):  # past the grace and both looks
            await eventually(lambda: exists(js), timeout=1.5, what="the durable to stay while pulled")
        await other.close()
        await eventually(lambda: gone(js), timeout=20, what="the idle durable to be deleted")
    finally:
        await shut(rt)


async def test_a_replica_starting_without_rules_deletes_a_durable_left_behind(nats_server):
    rt, rules, _ = await replica(nats_server.url, "b")
    try:
        rules.apply("after", record())
        await eventually(lambda: exists(rt.js), what="the durable")
    finally:
        await shut(rt)  # gone without its grace: the durable stays behind
    later, _, _ = await replica(nats_server.url, "c")
    try:
        assert await exists(later.js)
        await eventually(lambda: gone(later.js), timeout=20, what="the left-behind durable to be deleted")
    finally:
        await shut(later)


async def _pulled_by_one(js) -> bool:
    info = await js.consumer_info(subjects.STREAM_JOBS, DURABLE)
    return info.num_waiting >= 1
