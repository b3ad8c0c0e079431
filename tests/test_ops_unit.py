"""The runtime's operations pieces on their own: the per-replica endpoint, the runtime's
instruments, consumer lag from a real JetStream, and the JSON log lines."""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import nats
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from jobmesh.contract.messages.v1 import HealthReply
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.runtime import logs
from jobmesh.runtime.consumerlag import poll_once
from jobmesh.runtime.metrics import Metrics, install
from jobmesh.runtime.opsserver import OpsServer, parse_listen


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    out.setdefault(metric.name, []).append((dict(point.attributes), point.value))
    return out


# --- the endpoint -------------------------------------------------------------------------
async def test_healthz_answers_for_this_process_and_names_its_problems():
    state = {"ok": True}

    def health() -> HealthReply:
        if state["ok"]:
            return HealthReply(service="binder", instance="b-1", ok=True, detail="ok")
        return HealthReply(service="binder", instance="b-1", ok=False, detail="not connected to NATS; stopping")

    server = OpsServer("127.0.0.1:0", health)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok", "service": "binder", "instance": "b-1"}
            state["ok"] = False
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 503
                body = await resp.json()
                assert body["status"] == "unhealthy"
                assert body["problems"] == ["not connected to NATS", "stopping"]
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                # prometheus_client's own process figures are there even before any OTel reader
                assert "python_gc_objects_collected_total" in await resp.text()
    finally:
        await server.stop()


async def test_a_port_in_use_is_a_clear_error():
    first = OpsServer("127.0.0.1:0", lambda: HealthReply(service="s", instance="i", ok=True, detail="ok"))
    await first.start()
    try:
        second = OpsServer(f"127.0.0.1:{first.port}", first._health)
        with pytest.raises(Unavailable, match="JOBMESH_OPS_LISTEN"):
            await second.start()
    finally:
        await first.stop()


@pytest.mark.parametrize("value", ["9464", "host:", "host:99999", "host:port"])
def test_a_bad_listen_address_names_the_variable(value):
    with pytest.raises(InvalidSpec, match="JOBMESH_OPS_LISTEN") as caught:
        parse_listen(value, "JOBMESH_OPS_LISTEN")
    assert caught.value.field == "ops_listen"


def test_listen_addresses_parse():
    assert parse_listen(":9464", "V") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464", "V") == ("::1", 9464)
    assert parse_listen("127.0.0.1:0", "V") == ("127.0.0.1", 0)


# --- the runtime's instruments ----------------------------------------------------------
def test_the_runtime_instruments_record_batches_dead_letters_and_lag():
    reader = InMemoryMetricReader()
    m = Metrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    m.processed("tracker", "jobmesh.v1.job.{partition}.{kind}", 40)
    m.processed("tracker", "jobmesh.v1.job.{partition}.{kind}", 2)
    m.dead_lettered("tracker", "undecodable")
    m.set_lag("JM_JOBS", "tracker-jobs", 7, 3)
    points = _points(reader)
    assert points["jobmesh.messages.processed"] == [
        ({"service": "tracker", "destination": "jobmesh.v1.job.{partition}.{kind}"}, 42)
    ]
    assert points["jobmesh.dead_letters"] == [({"service": "tracker", "reason": "undecodable"}, 1)]
    assert points["jobmesh.consumer.lag"] == [({"stream": "JM_JOBS", "durable": "tracker-jobs"}, 7)]
    assert points["jobmesh.consumer.ack_pending"] == [({"stream": "JM_JOBS", "durable": "tracker-jobs"}, 3)]


def test_no_provider_is_installed_unless_asked():
    assert install("binder", scrape=False, env={}) is None
    assert install("binder", scrape=True, env={"OTEL_METRICS_EXPORTER": "none"}) is None
    assert install("binder", scrape=True, env={"OTEL_SDK_DISABLED": "true"}) is None


async def test_consumer_lag_is_read_from_jetstream(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="LAGTEST", subjects=["lagtest.>"])
        await js.pull_subscribe("lagtest.>", durable="lag-reader", stream="LAGTEST")
        for i in range(5):
            await js.publish(f"lagtest.{i}", b"x")
        reader = InMemoryMetricReader()
        m = Metrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
        await poll_once(js, [("LAGTEST", "lag-reader"), ("LAGTEST", "no-such-durable")], m)
        # The unknown durable is skipped; the real one shows its five undelivered messages.
        assert _points(reader)["jobmesh.consumer.lag"] == [({"stream": "LAGTEST", "durable": "lag-reader"}, 5)]
    finally:
        await nc.close()


# --- logs ---------------------------------------------------------------------------------
def _logged(formatter: logging.Formatter, emit) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("jobmesh.test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_the_ids_of_the_message_being_handled():
    token = logs.current.set(
        logs.ids_from_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", job_id="j1")
    )
    try:
        line = _logged(logs.JsonFormatter("scheduler"), lambda log: log.warning("held %s", "q1"))
    finally:
        logs.current.reset(token)
    record = json.loads(line)
    assert record["level"] == "WARNING" and record["service"] == "scheduler" and record["msg"] == "held q1"
    assert record["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert record["span_id"] == "b7ad6b7169203331"
    assert record["job_id"] == "j1"
    assert record["ts"].endswith("Z") and record["logger"] == "jobmesh.test.logs"


def test_a_call_s_own_job_id_wins_and_tracebacks_are_kept():
    def emit(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"job_id": "j2"})

    record = json.loads(_logged(logs.JsonFormatter("executor"), emit))
    assert record["job_id"] == "j2" and "trace_id" not in record
    assert "ValueError: boom" in record["exc"]


def test_text_lines_are_plain_and_name_the_job():
    token = logs.current.set(logs.LogIds(job_id="j3"))
    try:
        line = _logged(logs.TextFormatter("binder"), lambda log: log.info("bound"))
    finally:
        logs.current.reset(token)
    assert " INFO binder jobmesh.test.logs: bound [job j3]" in line
    assert not line.lstrip().startswith("{")


def test_a_malformed_traceparent_gives_no_trace_id():
    assert logs.ids_from_traceparent("garbage", job_id="j") == logs.LogIds(job_id="j")


def test_a_line_naming_a_job_carries_its_id():
    job = "7699f93065fd20621d31beb713806e7e"
    record = json.loads(_logged(logs.JsonFormatter("scheduler"), lambda log: log.info("job %s: attempt 1 lost", job)))
    assert record["job_id"] == job


def test_a_nats_url_list_names_every_server():
    from jobmesh.runtime.settings import Settings

    many = Settings.from_env("binder", {"JOBMESH_NATS_URL": "nats://a:4222, nats://b:4222,nats://c:4222"})
    assert many.nats_servers == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert Settings.from_env("binder", {"JOBMESH_NATS_URL": "nats://one:4222"}).nats_servers == ["nats://one:4222"]
