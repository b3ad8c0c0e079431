"""Talk to jobmesh with nats-py alone: submit a job, fire a rule with an event, follow jobs.

This is what an integrator in any language does, written in Python with nothing but the
``nats-py`` package and the standard library (no jobmesh import): every message is the JSON
that ``schemas/v1/*.json`` describes, and every job id is computed here with hashlib, the
way docs/integrations.md ("Job ids") says. Run it against a cluster (``jobmesh dev``):

    python examples/integrations/nats_py_client.py --url nats://127.0.0.1:4222

It prints one JSON line per step and exits 0 when both jobs have succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid
from typing import Any

import nats
from nats.js.api import DeliverPolicy

PREFIX = "jobmesh.v1"
JOB_ENDS = {"job.succeeded", "job.gave_up", "job.cancelled", "job.expired"}


def job_id_for(idempotency_key: str) -> str:
    """The id jobmesh gives the job submitted with ``idempotency_key``.

    BLAKE2b, 16-byte digest, no key or salt, personalisation "jobmesh.job.v1" (zero-padded
    to 16 bytes), over the key's UTF-8 bytes, as 32 lower-case hex digits.
    """
    return hashlib.blake2b(idempotency_key.encode("utf-8"), digest_size=16, person=b"jobmesh.job.v1").hexdigest()


async def request(nc: Any, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    """One API request: JSON out, JSON back; an ``api.error`` reply raises."""
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=10)
    answer: dict[str, Any] = json.loads(reply.data)
    if answer["type"] == "api.error":
        raise RuntimeError(f"{answer['code']}: {answer['message']} (field {answer['field'] or '-'})")
    return answer


async def watch_events(js: Any) -> Any:
    """Start reading lifecycle events now (before submitting, so that none is missed).

    An ordered consumer: in order, nothing durable left behind. Each kind has its own
    subject (jobmesh.v1.job.<partition>.<kind>, and an executor's reports add its node:
    jobmesh.v1.job.<partition>.<kind>.<node>), so a reader that needs only the ends
    filters on jobmesh.v1.job.*.succeeded and jobmesh.v1.job.*.succeeded.* and so on;
    this one reads every kind.
    """
    return await js.subscribe(f"{PREFIX}.job.>", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)


async def wait_for_ends(sub: Any, job_ids: set[str], timeout: float) -> dict[str, str]:
    """Read events until each of ``job_ids`` has ended for good.

    Returns:
        Each job's end (``job.succeeded``, ``job.gave_up``, ...).
    """
    ended: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while set(ended) != job_ids:
        msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
        event = json.loads(msg.data)
        if event["job_id"] in job_ids:
            print(json.dumps({"event": event["type"], "job_id": event["job_id"], "subject": msg.subject}))
            if event["type"] in JOB_ENDS:
                ended[event["job_id"]] = event["type"]
    return ended


async def main(url: str, timeout: float) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    run = uuid.uuid4().hex[:8]
    events = await watch_events(js)
    try:
        # 1. Submit a job with our own idempotency key: we know its id before we send it,
        #    and sending the same request again gives the same job (duplicates[0] true).
        key = f"example-{run}"
        # The tracker announces each recorded change of the job on its watch subject (core
        # NATS, not stored): subscribe before submitting, as the id is known already.
        watch = await nc.subscribe(f"{PREFIX}.watch.{job_id_for(key)}")
        submit = {
            "type": "api.submit",
            "jobs": [
                {
                    "idempotency_key": key,
                    "spec": {"name": "hello", "runtime": {"kind": "process", "argv": ["echo", "hello from nats-py"]}},
                }
            ],
        }
        reply = await request(nc, f"{PREFIX}.api.submit", submit)
        assert reply["job_ids"] == [job_id_for(key)], reply
        again = await request(nc, f"{PREFIX}.api.submit", submit)
        assert again["job_ids"] == reply["job_ids"] and again["duplicates"] == [True], again
        print(json.dumps({"submitted": reply["job_ids"][0], "key": key}))

        # 2. A rule that fires on events, then an event for it. With a Nats-Msg-Id the
        #    event's identity is "id:<msg id>", so the fired job's id is known too.
        rule = f"example-{run}"
        put = {
            "type": "api.triggers.put",
            "rule": {
                "name": rule,
                "source": {"kind": "event", "subjects": [f"{PREFIX}.events.example.{run}"]},
                "job": {"name": "for {{ event.order }}", "runtime": {"kind": "noop"}},
                # Checked against the rule's filter and template when the rule is put.
                "sample": {"subject": f"{PREFIX}.events.example.{run}", "data": {"order": 1}},
            },
        }
        record = (await request(nc, f"{PREFIX}.api.triggers.put", put))["record"]
        msg_id = f"order-{run}"
        ack = await js.publish(
            f"{PREFIX}.events.example.{run}", json.dumps({"order": 7}).encode(), headers={"Nats-Msg-Id": msg_id}
        )
        fired = job_id_for(f"trigger:{rule}:{record['version']}:id:{msg_id}")
        print(json.dumps({"published": ack.seq, "stream": ack.stream, "fires": fired}))

        # 3. Follow both jobs to their end, from the lifecycle events.
        ended = await wait_for_ends(events, {reply["job_ids"][0], fired}, timeout)

        # 4. And read one back, once the tracker has recorded its end (its view follows the
        #    events, a moment behind them: the watch subject says when).
        deadline = time.monotonic() + timeout
        while not json.loads((await watch.next_msg(timeout=max(0.1, deadline - time.monotonic()))).data)["final"]:
            pass
        await watch.unsubscribe()
        view = await request(nc, f"{PREFIX}.api.jobs.get", {"type": "api.jobs.get", "job_id": reply["job_ids"][0]})
        print(
            json.dumps({"job": view["job_id"], "state": view["state"], "output": view["attempts"][-1]["output_tail"]})
        )
        await request(nc, f"{PREFIX}.api.triggers.delete", {"type": "api.triggers.delete", "name": rule})
        return 0 if set(ended.values()) == {"job.succeeded"} else 1
    finally:
        await events.unsubscribe()
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="the NATS server")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the jobs to end")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.url, args.timeout)))
