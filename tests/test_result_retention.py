"""Results expire by a retention setting: jm_results gets the configured max age at
creation, and `jobmesh provision` (update) applies a changed one to an existing bucket."""

from __future__ import annotations

import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.settings import Settings

pytestmark = pytest.mark.integration


async def _max_age(js) -> float:
    return (await js.stream_info(f"OBJ_{subjects.OBJ_RESULTS}")).config.max_age


def test_the_default_retention_is_a_week():
    assert Settings().result_retention_seconds == 7 * 86_400


async def test_the_retention_setting_is_the_results_buckets_max_age(tmp_path_factory):
    from jobmesh.dev.servers import NatsServer

    server = NatsServer(tmp_path_factory.mktemp("retention")).start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision(js, result_retention=3600)
        assert await _max_age(js) == pytest.approx(3600)
        await provision(js, result_retention=7200)  # without update: limits stay as created
        assert await _max_age(js) == pytest.approx(3600)
        await provision(js, result_retention=7200, update=True)
        assert await _max_age(js) == pytest.approx(7200)
        await nc.close()
    finally:
        server.stop()
