"""Reading the dead letters (stream ``JM_DEADLETTER``) and replaying one.

A dead letter records a message a service refused (undecodable, invalid, oversized), with
the reason and, since the lifecycle issue, the whole payload. It is addressed by its
sequence number in ``JM_DEADLETTER``. Replaying republishes the payload to the subject it
was refused on, once: the message id is ``replay:<seq>``, so a second replay within the
stream's duplicate window is reported as a duplicate and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from jobmesh.contract import subjects
from jobmesh.contract.ids import EVENT_ID_HEADER, replay_id
from jobmesh.contract.messages.v1 import DeadLetter
from jobmesh.errors import InvalidMessage, NotFound, Overloaded, Unavailable, UsageError

__all__ = ["DeadLetterEntry", "DeadLetterPage", "Replayed", "read_dead_letters", "replay_dead_letter"]

# How long to wait for the next record while reading the stream (they are all stored).
_READ_TIMEOUT = 5.0
_decoder = msgspec.json.Decoder(DeadLetter)


class DeadLetterEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter and its sequence in ``JM_DEADLETTER`` (what ``replay`` takes)."""

    seq: int
    letter: DeadLetter


class DeadLetterPage(msgspec.Struct, frozen=True, kw_only=True):
    """The newest records on the dead-letter subjects, oldest first.

    Attributes:
        entries: the dead letters among them.
        unreadable: how many of them are not dead letters (someone published there by
            hand); skipped.
    """

    entries: list[DeadLetterEntry]
    unreadable: int = 0


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay did.

    Attributes:
        seq: the dead letter replayed.
        subject: where its payload went again.
        stream: the stream that stored it.
        stream_seq: its new sequence in that stream.
        duplicate: True when this dead letter was replayed already (within the stream's
            duplicate window): nothing was published this time.
    """

    seq: int
    subject: str
    stream: str
    stream_seq: int
    duplicate: bool


async def read_dead_letters(nc: NATS, service: str = "", limit: int = 50, timeout: float = 10.0) -> DeadLetterPage:
    """The newest ``limit`` records on the dead-letter subjects, of one service or of all.

    Args:
        nc: a connected NATS client.
        service: only this service's dead letters ("" for every service).
        limit: at most this many records, the newest (a record that is not a dead letter
            counts, and is reported in ``unreadable``).
        timeout: seconds for each JetStream request.

    Returns:
        The dead letters, oldest first; none when the stream does not exist yet.

    Raises:
        Unavailable: when the stream cannot be read.
    """
    subject = subjects.deadletter(service) if service else subjects.DEADLETTER_ALL
    js = nc.jetstream(timeout=timeout)
    try:
        info = await js.stream_info(subjects.STREAM_DEADLETTER, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return DeadLetterPage(entries=[])
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read {subjects.STREAM_DEADLETTER}: {type(exc).__name__} {exc}".rstrip()) from exc
    matching = sum((info.state.subjects or {}).values()) if service else info.state.messages
    if not matching:
        return DeadLetterPage(entries=[])
    # Without a filter the newest ``limit`` are the last sequences; with one, read them all
    # and keep the last (dead letters are few; the stream keeps at most a million).
    start = max(info.state.first_seq, info.state.last_seq - limit + 1) if not service else info.state.first_seq
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    kept: deque[DeadLetterEntry | None] = deque(maxlen=limit)  # None: a record that is no dead letter
    try:
        sub = await js.subscribe(subject, stream=subjects.STREAM_DEADLETTER, ordered_consumer=True, config=config)
        try:
            while True:
                msg = await sub.next_msg(timeout=_READ_TIMEOUT)
                try:
                    kept.append(DeadLetterEntry(seq=msg.metadata.sequence.stream, letter=_decoder.decode(msg.data)))
                except msgspec.DecodeError:
                    kept.append(None)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read {subjects.STREAM_DEADLETTER}: {type(exc).__name__} {exc}".rstrip()) from exc
    entries = [e for e in kept if e is not None]
    return DeadLetterPage(entries=entries, unreadable=len(kept) - len(entries))


async def replay_dead_letter(nc: NATS, seq: int, timeout: float = 10.0) -> Replayed:
    """Publish a dead letter's whole payload again, to the subject it was refused on.

    Args:
        nc: a connected NATS client.
        seq: the dead letter's sequence in ``JM_DEADLETTER``.
        timeout: seconds for each JetStream request.

    Returns:
        Where the payload went.

    Raises:
        NotFound: when there is no dead letter ``seq``.
        UsageError: when it cannot be replayed: it carries no payload (recorded by an older
            version), or it was a refused request rather than a stream message.
        Unavailable: when JetStream does not answer.
    """
    js = nc.jetstream(timeout=timeout)
    try:
        raw = await js.get_msg(subjects.STREAM_DEADLETTER, seq)
    except nats.js.errors.NotFoundError as exc:
        raise NotFound(f"there is no dead letter {seq} in {subjects.STREAM_DEADLETTER}") from exc
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read {subjects.STREAM_DEADLETTER}: {type(exc).__name__} {exc}".rstrip()) from exc
    try:
        letter = _decoder.decode(raw.data or b"")
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"record {seq} of {subjects.STREAM_DEADLETTER} is not a dead letter: {exc}") from exc
    payload = _payload_of(seq, letter)
    try:
        headers = {"Nats-Msg-Id": replay_id(seq)}
        if letter.event_id:
            headers[EVENT_ID_HEADER] = letter.event_id  # a trigger event: keeps its identity
        ack = await js.publish(letter.subject, payload, headers=headers)
    except nats.js.errors.NoStreamResponseError as exc:
        raise UsageError(
            f"no stream stores {letter.subject} any more; dead letter {seq} cannot go back", field="seq"
        ) from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code == 10077:  # the stream is full (discard=new): a later replay may pass
            raise Overloaded(f"{letter.subject} refused the replay: {exc.description}") from exc
        raise Unavailable(f"the replay to {letter.subject} failed: {exc.description}") from exc
    except nats.errors.Error as exc:
        raise Unavailable(f"the replay to {letter.subject} failed: {type(exc).__name__} {exc}".rstrip()) from exc
    return Replayed(
        seq=seq, subject=letter.subject, stream=ack.stream, stream_seq=ack.seq, duplicate=bool(ack.duplicate)
    )


def _payload_of(seq: int, letter: DeadLetter) -> bytes:
    """The payload to replay, or why there is none."""
    if not letter.stream_seq:
        raise UsageError(
            f"dead letter {seq} is a refused request on {letter.subject}, not a stream message: its sender got an"
            " error reply, and there is nothing to replay it into",
            field="seq",
        )
    if not letter.payload_b64:
        raise UsageError(
            f"dead letter {seq} carries no payload (a service of an older version recorded it), so it cannot be"
            f" replayed; what it held began with {letter.payload_head[:80]!r}",
            field="seq",
        )
    try:
        return base64.b64decode(letter.payload_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMessage(
            f"dead letter {seq} holds a payload that is not base64: {exc}", field="payload_b64"
        ) from exc
