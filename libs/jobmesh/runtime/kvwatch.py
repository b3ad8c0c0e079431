"""Following a KV bucket for as long as a service runs: one loop for every live view.

The node view (``jm_nodes``), the binder's allocation view (``jm_alloc``) and the trigger's
handler schemas (``jm_handlers``) each keep a cache current from a ``watchall`` of their
bucket. :func:`watch_forever` is that loop: it opens the watch (again, with backoff, while
NATS or JetStream is not ready), hands it to the view's own ``follow``, and starts afresh
whenever the view's ``restart`` event is set (after a reconnect). What a view does with
the entries stays its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from jobmesh.runtime.backoff import backoff


async def watch_forever(
    open_watch: Callable[[], Awaitable[Any]],
    follow: Callable[[Any], Awaitable[None]],
    restart: asyncio.Event,
    *,
    name: str,
    bucket: str,
    log: logging.Logger,
) -> None:
    """Follow a bucket forever (run it as a background task).

    Args:
        open_watch: opens the watch (``kv.watchall()``, after looking the bucket up).
        follow: consumes the watch's entries until it ends or is cancelled.
        restart: set to start the watch afresh; cleared at each start.
        name: the view, for the log (``node view``).
        bucket: its bucket, for the log (``jm_nodes``).
        log: the view's logger.

    Raises:
        Exception: whatever ``follow`` raised (the view cannot go on).
    """
    failures = 0
    while True:
        restart.clear()
        try:
            watcher = await open_watch()
        except (TimeoutError, nats.errors.Error) as exc:
            # Right after NATS comes back JetStream may refuse the watch for a moment: the
            # view stays stale and the watch is tried again, instead of the service stopping.
            failures += 1
            delay = backoff(failures, base=0.2, cap=5.0)
            log.warning("%s: the watch failed (%s: %s); again in %.1fs", name, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        following = asyncio.ensure_future(follow(watcher))
        restarting = asyncio.ensure_future(restart.wait())
        try:
            await asyncio.wait({following, restarting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restarting.cancel()
            following.cancel()
            await asyncio.gather(following, restarting, return_exceptions=True)
            try:
                await watcher.stop()
            except Exception:
                # The old watch may be on a dead connection; it is dropped either way.
                log.debug("stopping a watch of %s failed", bucket, exc_info=True)
        failure = following.exception() if following.done() and not following.cancelled() else None
        if failure is not None:
            raise failure
        log.info("%s: watching %s afresh", name, bucket)


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key a KV bucket holds an entry for, sorted, deleted ones included.

    nats-py's ``kv.keys()`` decides it has seen everything from a consumer-info answer
    that can come before the first entry reaches the client, so right after a put it can
    answer "no keys" for a bucket that has one. The stream's own subject list has no such
    race: one request. A deleted or purged key keeps a marker, so callers read each key and
    skip those that are gone.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in (info.state.subjects or {}))
