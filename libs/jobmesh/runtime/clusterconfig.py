"""Reading and writing cluster configuration in the ``jm_config`` KV bucket.

Keys: ``queue.<name>`` (QueueConfig), ``tenant.<name>`` (TenantConfig), ``zones``
(ZoneMap). Values are JSON, so ``nats kv put`` works as well as ``jobmesh queue set``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import QueueConfig, TenantConfig, ZoneMap

log = logging.getLogger("jobmesh.config")

_queue = msgspec.json.Decoder(QueueConfig)
_tenant = msgspec.json.Decoder(TenantConfig)
_zones = msgspec.json.Decoder(ZoneMap)


class ClusterConfig:
    """A live view of ``jm_config``; calls ``on_change`` after every applied change."""

    def __init__(self, js: JetStreamContext, on_change: Callable[[], None] | None = None) -> None:
        self._js = js
        self._on_change = on_change
        self.queues: dict[str, QueueConfig] = {}
        self.tenants: dict[str, TenantConfig] = {}
        self.zones = ZoneMap()
        self._ready = asyncio.Event()

    def queue(self, name: str) -> QueueConfig:
        return self.queues.get(name) or QueueConfig()

    def weight(self, tenant: str) -> float:
        config = self.tenants.get(tenant)
        return config.weight if config else 1.0

    async def run(self) -> None:
        """Watch the bucket forever (a background task)."""
        kv = await self._js.key_value(subjects.KV_CONFIG)
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:
                self._ready.set()
                continue
            self.apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)
            if self._on_change is not None:
                self._on_change()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    def apply(self, key: str, value: bytes | None) -> None:
        """Apply one key's new value (None: deleted). A bad value is logged and ignored."""
        kind, _, name = key.partition(".")
        try:
            if kind == "queue":
                if value is None:
                    self.queues.pop(name, None)
                else:
                    self.queues[name] = _queue.decode(value)
            elif kind == "tenant":
                if value is None:
                    self.tenants.pop(name, None)
                else:
                    self.tenants[name] = _tenant.decode(value)
            elif key == "zones":
                self.zones = _zones.decode(value) if value is not None else ZoneMap()
        except msgspec.DecodeError as exc:
            # Writers validate (the CLI does); a hand-written bad value must not stop us.
            log.warning("ignoring invalid configuration under %s: %s", key, exc)


async def put_config(js: JetStreamContext, key: str, value: QueueConfig | TenantConfig | ZoneMap) -> None:
    """Write one configuration value."""
    kv = await js.key_value(subjects.KV_CONFIG)
    await kv.put(key, encode(value))
