"""``jobmesh dead-letters`` and ``dead-letters replay`` against a real nats-server.

The dead letters here are written the way a service writes them (a ``DeadLetter`` on
``jobmesh.v1.deadletter.<service>``, after the refused message was stored), so that every
case the command must handle is there at once: letters of several services, one for a
refused API request, one recorded without its payload, and a record that is no dead
letter at all. ``test_cli_lifecycle`` shows the same against the services themselves.
"""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import DeadLetter
from tests.cluster_fixtures import jobmesh_cli

pytestmark = pytest.mark.integration


def _json_of(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _letter(service: str, subject: str, payload: bytes, stream_seq: int, keep_payload: bool = True) -> bytes:
    return msgspec.json.encode(
        DeadLetter(
            service=service,
            subject=subject,
            code="invalid_message",
            reason="malformed JSON: truncated",
            size=len(payload),
            payload_head=payload[:512].decode("utf-8", "replace"),
            stream_seq=stream_seq,
            deliveries=1,
            at=1_700_000_000.0,
            payload_b64=base64.b64encode(payload).decode() if keep_payload else "",
        )
    )


async def test_dead_letters_are_listed_filtered_and_replayed_once(nats_server, nc):
    url = nats_server.url
    provisioned = jobmesh_cli(["provision"], url)
    assert provisioned.returncode == 0, provisioned.stderr
    empty = jobmesh_cli(["dead-letters"], url)
    assert empty.returncode == 0, empty.stderr
    assert "no dead letters" in empty.stderr

    js = nc.jetstream()
    started = subjects.job_event(0, subjects.STARTED)
    refused = b'{"type": "job.started", "job_id": "dl-1", oops'
    original = await js.publish(started, refused, headers={"Nats-Msg-Id": "dl-original"})
    seqs = []
    for service, subject, payload, stream_seq, keep in (
        ("tracker", started, refused, original.seq, True),
        ("scheduler", started, refused, original.seq, True),
        ("trigger", subjects.API_SUBMIT, b"not json", 0, True),  # a refused request
        ("binder", started, refused, original.seq, False),  # recorded before payloads were kept
    ):
        ack = await js.publish(subjects.deadletter(service), _letter(service, subject, payload, stream_seq, keep))
        seqs.append(ack.seq)
    await js.publish(subjects.deadletter("binder"), b"no dead letter")
    tracker_seq, _, request_seq, old_seq = seqs

    listed = _json_of(jobmesh_cli(["dead-letters", "--json"], url))
    assert [d["seq"] for d in listed] == seqs  # oldest first; the record that is none is skipped
    assert listed[0]["service"] == "tracker" and listed[0]["payload_b64"] == base64.b64encode(refused).decode()
    only = _json_of(jobmesh_cli(["dead-letters", "--service", "tracker", "--json"], url))
    assert [d["seq"] for d in only] == [tracker_seq]
    newest = _json_of(jobmesh_cli(["dead-letters", "--limit", "3", "--json"], url))
    assert [d["seq"] for d in newest] == seqs[2:]  # the newest three records, one of them no dead letter
    table = jobmesh_cli(["dead-letters", "--service", "binder"], url)
    assert table.returncode == 0, table.stderr
    [row] = table.stdout.splitlines()[1:]
    assert row.split()[0] == str(old_seq) and "binder" in row and "malformed JSON: truncated" in row
    assert "1 record(s) on the dead-letter subjects are not dead letters" in table.stderr

    replayed = _json_of(jobmesh_cli(["dead-letters", "replay", str(tracker_seq), "--json"], url))
    assert replayed == {
        "seq": tracker_seq,
        "subject": started,
        "stream": subjects.STREAM_JOBS,
        "stream_seq": original.seq + 1,
        "duplicate": False,
    }
    republished = await js.get_msg(subjects.STREAM_JOBS, replayed["stream_seq"])
    assert republished.data == refused and republished.headers["Nats-Msg-Id"] == f"replay:{tracker_seq}"
    again = jobmesh_cli(["dead-letters", "replay", str(tracker_seq)], url)
    assert again.returncode == 0, again.stderr
    assert f"dead letter {tracker_seq} was replayed already" in again.stdout
    assert (await js.stream_info(subjects.STREAM_JOBS)).state.messages == 2  # the original and one replay

    request = jobmesh_cli(["dead-letters", "replay", str(request_seq)], url)
    assert request.returncode == 1, request.stderr
    assert "a refused request on jobmesh.v1.api.submit" in request.stderr and "(field seq)" in request.stderr
    old = jobmesh_cli(["dead-letters", "replay", str(old_seq)], url)
    assert old.returncode == 1 and "carries no payload" in old.stderr, old.stderr
    missing = jobmesh_cli(["dead-letters", "replay", "999999"], url)
    assert missing.returncode == 4 and "there is no dead letter 999999" in missing.stderr, missing.stderr
    bad = jobmesh_cli(["dead-letters", "replay", "0"], url)
    assert bad.returncode == 1 and "they count from 1" in bad.stderr, bad.stderr
