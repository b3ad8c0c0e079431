"""``jobmesh trigger`` against a real cluster: add a rule from a file, list, show, pause and
resume it, test it against events, remove it; a bad rule is refused naming its field; and
``status`` says which rule started a job the rule fired.

Each test runs the real command in a subprocess against the module's cluster (five service
processes, real NATS and Postgres) and uses a rule of its own name, so the tests do not
see each other's rules. What the commands print for a given reply is tested without a
cluster in ``test_trigger_cli_unit``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from tests.cluster_fixtures import jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def rule_text(name: str, filter: str = "event.n > 0") -> str:
    """The YAML of a minimal event rule named ``name`` (its job is named after the subject's last token)."""
    return f"""\
name: {name}
description: a rule of the CLI tests
source: {{kind: event, subjects: ["jobmesh.v1.events.{name}.*"]}}
filter: "{filter}"
job:
  name: "{name} {{{{ subject.tokens[4] }}}}"
  runtime: {{kind: noop}}
sample: {{subject: jobmesh.v1.events.{name}.x, data: {{n: 1}}}}
"""


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _json_of(result) -> dict:
    return json.loads(_ok(result))


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _row(url: str, name: str) -> dict | None:
    listed = _json_of(jobmesh_cli(["trigger", "list", "--json"], url))
    return next((t for t in listed["triggers"] if t["name"] == name), None)


async def test_a_rule_is_added_listed_shown_paused_resumed_and_removed(cluster, nats_server, tmp_path):
    url = nats_server.url
    path = _write(tmp_path, "life.yaml", rule_text("life"))

    assert _ok(jobmesh_cli(["trigger", "add", path], url)).strip() == "rule life added (version 1, active)"
    # The same rule again changes nothing; --json is the stored record.
    again = _json_of(jobmesh_cli(["trigger", "add", path, "--json"], url))
    assert again["changed"] is False and again["record"]["version"] == 1
    assert again["record"]["rule"]["name"] == "life" and again["record"]["paused"] is False

    table = _ok(jobmesh_cli(["trigger", "list"], url)).splitlines()
    assert table[0].split()[:4] == ["NAME", "KIND", "VERSION", "STATE"]
    [row] = [line.split() for line in table[1:] if line.split()[0] == "life"]
    assert row[:4] == ["life", "event", "1", "active"]
    listed = _row(url, "life")
    assert listed is not None and (listed["kind"], listed["version"], listed["paused"]) == ("event", 1, False)

    shown = _ok(jobmesh_cli(["trigger", "show", "life"], url))
    assert shown.splitlines()[0].split() == ["rule", "life", "version", "1", "active"]
    assert "rule:\n  name: life\n" in shown and "    subjects:\n    - jobmesh.v1.events.life.*" in shown
    view = _json_of(jobmesh_cli(["trigger", "show", "life", "--json"], url))
    assert view["record"]["rule"]["filter"] == "event.n > 0" and "stats" in view

    assert _ok(jobmesh_cli(["trigger", "pause", "life"], url)).strip() == "rule life is paused (version 1)"
    assert _row(url, "life")["paused"] is True
    assert _ok(jobmesh_cli(["trigger", "show", "life"], url)).splitlines()[0].endswith("paused")
    resumed = _json_of(jobmesh_cli(["trigger", "resume", "life", "--json"], url))
    assert resumed["record"]["paused"] is False and resumed["record"]["version"] == 1  # pausing keeps the version
    assert _row(url, "life")["paused"] is False

    # A changed definition is a new version.
    changed = _write(tmp_path, "life2.yaml", rule_text("life", filter="event.n > 1"))
    assert _ok(jobmesh_cli(["trigger", "add", changed], url)).strip() == "rule life changed (version 2, active)"

    removed = _json_of(jobmesh_cli(["trigger", "rm", "life", "--json"], url))
    assert removed["record"]["rule"]["name"] == "life"
    assert _row(url, "life") is None
    gone = jobmesh_cli(["trigger", "show", "life"], url)
    assert gone.returncode == 4, gone.stderr
    assert jobmesh_cli(["trigger", "rm", "life"], url).returncode == 4


async def test_a_rule_is_added_paused(cluster, nats_server, tmp_path):
    url = nats_server.url
    path = _write(tmp_path, "held.yaml", rule_text("held"))
    assert _ok(jobmesh_cli(["trigger", "add", path, "--paused"], url)).strip() == "rule held added (version 1, paused)"
    assert _row(url, "held")["paused"] is True
    _ok(jobmesh_cli(["trigger", "rm", "held"], url))


async def test_test_prints_the_job_an_event_would_make(cluster, nats_server, tmp_path):
    url = nats_server.url
    path = _write(tmp_path, "probe.yaml", rule_text("probe"))
    _ok(jobmesh_cli(["trigger", "add", path], url))
    try:
        # The rule's sample, by the stored rule's name.
        out = _ok(jobmesh_cli(["trigger", "test", "probe"], url)).splitlines()
        assert out[0] == "matched" and out[1].startswith("idempotency key ")
        assert "  name: probe x" in out[out.index("job:") :]
        reply = _json_of(jobmesh_cli(["trigger", "test", "probe", "--json"], url))
        assert reply["matched"] is True and reply["job"]["name"] == "probe x" and reply["idempotency_key"]

        # An event file holding a whole event.
        event = _write(tmp_path, "ev.json", json.dumps({"subject": "jobmesh.v1.events.probe.books", "data": {"n": 3}}))
        reply = _json_of(jobmesh_cli(["trigger", "test", "probe", event, "--json"], url))
        assert reply["matched"] is True and reply["job"]["name"] == "probe books"

        # With --subject the file is the event's data: n 0 does not pass the filter.
        data = _write(tmp_path, "data.json", json.dumps({"n": 0}))
        reply = _json_of(
            jobmesh_cli(["trigger", "test", "probe", data, "--subject", "jobmesh.v1.events.probe.y", "--json"], url)
        )
        assert reply["matched"] is False and reply["reason"]
        said = _ok(jobmesh_cli(["trigger", "test", "probe", data, "--subject", "jobmesh.v1.events.probe.y"], url))
        assert said.startswith("not matched: ")

        # --subject alone: the sample's data on another subject.
        reply = _json_of(
            jobmesh_cli(["trigger", "test", "probe", "--subject", "jobmesh.v1.events.probe.films", "--json"], url)
        )
        assert reply["matched"] is True and reply["job"]["name"] == "probe films"
    finally:
        _ok(jobmesh_cli(["trigger", "rm", "probe"], url))


async def test_test_of_a_rule_file_does_not_store_it(cluster, nats_server, tmp_path):
    url = nats_server.url
    path = _write(tmp_path, "draft.yaml", rule_text("draft"))
    reply = _json_of(jobmesh_cli(["trigger", "test", path, "--json"], url))
    assert reply["matched"] is True and reply["job"]["name"] == "draft x"
    assert _row(url, "draft") is None
    assert jobmesh_cli(["trigger", "test", "draft"], url).returncode == 4  # not a stored rule


async def test_a_bad_rule_is_refused_naming_its_field(cluster, nats_server, tmp_path):
    url = nats_server.url
    # Caught before sending: an unknown field.
    typo = _write(tmp_path, "typo.yaml", rule_text("typo") + "fliter: x\n")
    result = jobmesh_cli(["trigger", "add", typo], url)
    assert result.returncode == 1 and "(field fliter)" in result.stderr, result.stderr
    # Caught by the service: a filter that is not CEL.
    bad = _write(tmp_path, "badcel.yaml", rule_text("badcel", filter="event.n >"))
    result = jobmesh_cli(["trigger", "add", bad, "--json"], url)
    assert result.returncode == 1, result.stderr
    assert "filter" in result.stderr and result.stdout == ""
    assert _row(url, "badcel") is None


async def test_status_says_which_rule_started_a_job(cluster, nats_server, tmp_path):
    url = nats_server.url
    _ok(jobmesh_cli(["trigger", "add", _write(tmp_path, "fired.yaml", rule_text("fired"))], url))
    try:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.publish("jobmesh.v1.events.fired.books", json.dumps({"n": 2}).encode())
        finally:
            await nc.close()

        async def fired_job():
            jobs = _json_of(jobmesh_cli(["list", "--json"], url))
            return next((j["job_id"] for j in jobs if j["name"] == "fired books"), None)

        job_id = await eventually(fired_job, timeout=30, what="the rule's job to be recorded")
        status = _ok(jobmesh_cli(["status", job_id], url))
        [line] = [line for line in status.splitlines() if line.startswith("started by: ")]
        assert line.startswith("started by: rule fired v1 (event ") and line.endswith(
            " on jobmesh.v1.events.fired.books)"
        ), line
    finally:
        _ok(jobmesh_cli(["trigger", "rm", "fired"], url))
