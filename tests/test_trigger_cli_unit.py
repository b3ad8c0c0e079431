"""``jobmesh trigger`` without a cluster: reading rule and event files (and the errors a
person sees for a bad one), whether RULE names a file, the event ``test`` sends, and what
``list``, ``show``, ``test`` and ``status`` print for replies built by hand."""

from __future__ import annotations

import json

import pytest
import yaml

from jobmesh.client.cli import render, run_command
from jobmesh.client.cli import triggers as cli
from jobmesh.client.cli.exitcodes import EXIT_USAGE
from jobmesh.client.cli.parser import build_parser
from jobmesh.client.triggers import event_from, is_rule_file, load_document, read_rule_file, rule_from_data
from jobmesh.contract.messages.v1 import (
    EventSource,
    JobOrigin,
    PendingView,
    SampleEvent,
    ScheduleSource,
    TriggerListReply,
    TriggerRecord,
    TriggerReply,
    TriggerRule,
    TriggerStats,
    TriggerSummary,
    TriggerTestReply,
    TriggerView,
)
from jobmesh.errors import InvalidMessage, UsageError

NOW = 1_700_000_000.0
RULE_YAML = """\
name: t1
source: {kind: event, subjects: ["jobmesh.v1.events.demo.*"]}
filter: "event.n > 0"
job:
  name: "demo {{ subject.tokens[3] }}"
  runtime: {kind: noop}
sample: {subject: jobmesh.v1.events.demo.x, data: {n: 1}}
"""
RULE = TriggerRule(
    name="t1",
    source=EventSource(subjects=["jobmesh.v1.events.demo.*"]),
    filter="event.n > 0",
    job={"name": "demo {{ subject.tokens[3] }}", "runtime": {"kind": "noop"}},
    sample=SampleEvent(subject="jobmesh.v1.events.demo.x", data={"n": 1}),
)


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- reading rule files ----------------------------------------------------------------------
def test_a_yaml_rule_file_reads_into_the_rule(tmp_path):
    assert read_rule_file(_write(tmp_path, "t1.yaml", RULE_YAML)) == RULE


def test_a_json_rule_file_reads_into_the_same_rule_by_extension_or_by_content(tmp_path):
    text = json.dumps(json.loads(json.dumps(yaml.safe_load(RULE_YAML))))
    assert read_rule_file(_write(tmp_path, "t1.json", text)) == RULE
    assert read_rule_file(_write(tmp_path, "t1.rule", text)) == RULE  # no known suffix: by content


def test_bad_yaml_names_the_file_and_the_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "name: t1\nsource:\n  kind: event\n   subjects: [a]\njob: {}\n")
    with pytest.raises(UsageError) as caught:
        read_rule_file(path)
    assert str(caught.value).startswith(f"{path}: invalid YAML at line 4")
    assert caught.value.field == "file"


def test_bad_json_names_the_file_the_line_and_the_column(tmp_path):
    path = _write(tmp_path, "bad.json", '{"name": "t1",\n "source": }')
    with pytest.raises(UsageError, match=r"bad\.json: invalid JSON at line 2, column 12"):
        read_rule_file(path)


@pytest.mark.parametrize(
    ("text", "said"),
    [("- a\n- b\n", "not a list"), ("just words\n", "not a string"), ("# only a comment\n", "not nothing")],
)
def test_a_file_that_is_not_a_mapping_says_what_it_is(tmp_path, text, said):
    path = _write(tmp_path, "r.yaml", text)
    with pytest.raises(InvalidMessage, match=f"{path}: a rule must be a mapping.*{said}"):
        read_rule_file(path)


def test_a_missing_or_empty_file_is_a_usage_error_naming_it(tmp_path):
    with pytest.raises(UsageError, match=r"cannot read .*nope\.yaml"):
        read_rule_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(UsageError, match=r"empty\.yaml is empty"):
        read_rule_file(_write(tmp_path, "empty.yaml", "\n"))


@pytest.mark.parametrize(
    ("change", "field", "said"),
    [
        ({"fliter": "x"}, "fliter", "unknown field fliter"),
        ({"source": {"kind": "event", "subjects": ["a"], "subject": "b"}}, "source.subject", "unknown field"),
        ({"source": {"kind": "evnt"}}, "source.kind", "one of event, webhook, schedule, completion"),
        ({"source": {"kind": "event", "subjects": [1]}}, "source.subjects[0]", "Expected `str`, got `int`"),
        ({"name": "Bad Name"}, "name", "matching regex"),
        ({"debounce": {"seconds": 0}}, "debounce.seconds", "Expected `float` > 0.0"),
        ({"source": None}, "source", "Expected `object`"),
    ],
)
def test_a_wrong_field_is_named_before_any_round_trip(change, field, said):
    data = {**yaml.safe_load(RULE_YAML), **change}
    with pytest.raises(InvalidMessage) as caught:
        rule_from_data(data, "r.yaml")
    assert caught.value.field == field
    assert str(caught.value).startswith("r.yaml: ") and said in str(caught.value)


def test_a_missing_required_field_is_named():
    with pytest.raises(InvalidMessage, match="missing required field source") as caught:
        rule_from_data({"name": "t1", "job": {}}, "r.yaml")
    assert caught.value.field == "source"


def test_a_bad_rule_file_exits_1_with_the_field_before_connecting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOBMESH_NATS_URL", "nats://127.0.0.1:1")  # nothing there: must not be asked
    path = _write(tmp_path, "typo.yaml", RULE_YAML + "fliter: x\n")
    code = run_command(build_parser().parse_args(["trigger", "add", path]))
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid_message" in err and "unknown field fliter" in err and "(field fliter)" in err


# --- RULE: a stored rule or a file -----------------------------------------------------------
@pytest.mark.parametrize(
    ("arg", "exists", "is_file"),
    [
        ("t1", False, False),
        ("dataset-reindex", False, False),
        ("t1.yaml", False, True),  # a rule file's suffix, even when missing: reading it says so
        ("rules/T1.YML", False, True),
        ("t1.json", False, True),
        ("rules/t1", True, True),  # an existing path without a suffix
        ("t1", True, True),  # a file called like a rule, in this directory: the file wins
    ],
)
def test_rule_is_a_file_when_it_exists_or_has_a_rule_files_suffix(arg, exists, is_file):
    assert is_rule_file(arg, exists=lambda _: exists) is is_file


# --- the event test sends --------------------------------------------------------------------
SAMPLE = SampleEvent(subject="jobmesh.v1.events.demo.x", data={"n": 1}, headers={"a": "1"})


def test_no_event_and_no_flags_leaves_it_to_the_rules_sample():
    assert event_from(None, sample=SAMPLE) is None


def test_flags_without_a_file_change_the_samples_subject_and_headers():
    event = event_from(None, "jobmesh.v1.events.demo.y", ["b=2"], SAMPLE)
    assert event == SampleEvent(subject="jobmesh.v1.events.demo.y", data={"n": 1}, headers={"a": "1", "b": "2"})


def test_an_event_file_is_a_sample_event_unless_subject_is_given():
    data = {"subject": "jobmesh.v1.events.demo.z", "data": {"n": 5}, "headers": {"h": "x"}}
    assert event_from(data, headers=["k=v=w"]) == SampleEvent(
        subject="jobmesh.v1.events.demo.z", data={"n": 5}, headers={"h": "x", "k": "v=w"}
    )
    # With --subject the whole file is the event's data.
    assert event_from(data, "s.t") == SampleEvent(subject="s.t", data=data)
    assert event_from([1, 2], "s.t") == SampleEvent(subject="s.t", data=[1, 2])


def test_a_bad_event_file_or_header_is_named():
    with pytest.raises(InvalidMessage, match=r"ev\.json: unknown field dta") as caught:
        event_from({"subject": "a", "dta": {}}, source="ev.json")
    assert caught.value.field == "dta"
    with pytest.raises(InvalidMessage, match="give --subject"):
        event_from([1], source="ev.json")
    with pytest.raises(InvalidMessage, match=r"has none of them .*give --subject"):
        event_from({"n": 5}, source="ev.json")  # the data alone, without --subject
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        event_from(None, headers=["novalue"])


def test_an_event_file_may_be_yaml_or_json(tmp_path):
    assert load_document(_write(tmp_path, "e.json", '{"subject": "a", "data": 1}'), field="event") == {
        "subject": "a",
        "data": 1,
    }
    assert load_document(_write(tmp_path, "e.yaml", "subject: a\ndata: 1\n")) == {"subject": "a", "data": 1}


# --- what is printed -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ts", "text"),
    [(0, "-"), (NOW - 5, "5s ago"), (NOW - 125, "2m ago"), (NOW - 7300, "2h ago"), (NOW + 90, "in 1m")],
)
def test_relative_times(ts, text):
    assert cli.relative(ts, NOW) == text


def _record(paused: bool = False, version: int = 1, rule: TriggerRule = RULE) -> TriggerRecord:
    return TriggerRecord(rule=rule, version=version, paused=paused, created_at=NOW - 600, updated_at=NOW - 60)


@pytest.mark.parametrize(
    ("reply", "action", "line"),
    [
        (TriggerReply(record=_record()), "add", "rule t1 added (version 1, active)"),
        (TriggerReply(record=_record(version=3)), "add", "rule t1 changed (version 3, active)"),
        (TriggerReply(record=_record(paused=True), changed=False), "add", "rule t1 unchanged (version 1, paused)"),
        (TriggerReply(record=_record(paused=True)), "pause", "rule t1 is paused (version 1)"),
        (TriggerReply(record=_record(), changed=False), "resume", "rule t1 is already active (version 1)"),
        (TriggerReply(record=_record()), "rm", "rule t1 removed (it was version 1, active)"),
    ],
)
def test_the_line_add_rm_pause_and_resume_print(reply, action, line):
    assert cli.stored_line(reply, action) == line


LIST = TriggerListReply(
    triggers=[
        TriggerSummary(
            name="nightly",
            kind="schedule",
            version=2,
            paused=True,
            description="",
            stats=TriggerStats(fires=12, failures=1, last_fire_at=NOW - 3600),
            next_tick=NOW + 600,
        ),
        TriggerSummary(
            name="t1", kind="event", version=1, paused=False, description="", stats=TriggerStats(), pending=3
        ),
    ]
)


def test_list_prints_one_row_per_rule_with_its_figures(capsys):
    cli.trigger_list(LIST, NOW, as_json=False)
    header, nightly, t1 = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "NAME",
        "KIND",
        "VERSION",
        "STATE",
        "FIRES",
        "FAILURES",
        "LAST",
        "FIRE",
        "NEXT",
        "TICK",
        "PENDING",
    ]
    assert nightly.split() == ["nightly", "schedule", "2", "paused", "12", "1", "1h", "ago", "in", "10m", "0"]
    assert t1.split() == ["t1", "event", "1", "active", "0", "0", "-", "-", "3"]


def test_list_of_nothing_says_how_to_add_one(capsys):
    cli.trigger_list(TriggerListReply(triggers=[]), NOW, as_json=False)
    out = capsys.readouterr()
    assert out.out.split() == [
        "NAME",
        "KIND",
        "VERSION",
        "STATE",
        "FIRES",
        "FAILURES",
        "LAST",
        "FIRE",
        "NEXT",
        "TICK",
        "PENDING",
    ]
    assert "jobmesh trigger add FILE" in out.err


def test_list_json_is_the_reply(capsys):
    cli.trigger_list(LIST, NOW, as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in out["triggers"]] == ["nightly", "t1"] and out["triggers"][0]["stats"]["fires"] == 12


def test_show_prints_the_state_the_rule_as_yaml_and_what_is_pending():
    view = TriggerView(
        record=_record(version=2),
        stats=TriggerStats(
            fires=3, failures=1, last_fire_at=NOW - 30, last_error="no such key", last_error_at=NOW - 40
        ),
        pending=[
            PendingView(key="books", kind="debounce", events=4, first_at=NOW - 20, last_at=NOW - 2, due_at=NOW + 8),
            PendingView(
                key="o-1",
                kind="correlate",
                events=2,
                first_at=NOW - 50,
                last_at=NOW - 9,
                due_at=NOW + 250,
                parts={"paid": 1, "packed": 1},
            ),
        ],
    )
    lines = cli.show_lines(view, NOW)
    assert lines[0].split() == ["rule", "t1", "version", "2", "active"]
    assert "(10m ago)" in lines[1] and "(1m ago)" in lines[2]
    assert "fires     3 (last 30s ago), 1 failure, 0 skipped while paused" in lines
    assert any(line.startswith("error ") and "no such key" in line for line in lines)
    assert not any(line.startswith("next tick") for line in lines)  # not a schedule
    rule_at, pending_at = lines.index("rule:"), lines.index("pending (2):")
    yaml_text = "\n".join(line[2:] for line in lines[rule_at + 1 : pending_at])
    assert rule_from_data(yaml.safe_load(yaml_text)) == RULE  # what add reads back
    table = lines[pending_at + 1 :]
    assert table[0].split() == ["KEY", "KIND", "EVENTS", "FIRST", "LAST", "DUE", "PARTS"]
    assert table[1].split() == ["books", "debounce", "4", "20s", "ago", "2s", "ago", "in", "8s", "-"]
    assert table[2].split()[-2:] == ["packed=1,", "paid=1"]  # by part name


def test_show_of_a_paused_schedule_says_when_it_was_paused_and_its_next_tick():
    rule = TriggerRule(name="nightly", source=ScheduleSource(cron="0 3 * * *"), job={"runtime": {"kind": "noop"}})
    record = TriggerRecord(rule=rule, version=1, paused=True, paused_at=NOW - 5)
    lines = cli.show_lines(TriggerView(record=record, stats=TriggerStats(), next_tick=NOW + 3600), NOW)
    assert lines[0].endswith("paused")
    assert any(line.startswith("paused ") and "(5s ago)" in line for line in lines)
    assert any(line.startswith("next tick") and "(in 1h)" in line for line in lines)
    assert "pending" not in "\n".join(lines)
    assert "  source:" in lines and "    kind: schedule" in lines


def test_show_json_is_the_view(capsys):
    cli.trigger_show(TriggerView(record=_record(), stats=TriggerStats()), NOW, as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["record"]["rule"]["name"] == "t1" and out["record"]["version"] == 1


def test_test_prints_matched_the_key_and_the_job_as_yaml():
    reply = TriggerTestReply(
        matched=True, job={"name": "demo x", "runtime": {"kind": "noop"}}, idempotency_key="trigger:t1:1:abc"
    )
    lines = cli.tested_lines(reply)
    assert lines[:3] == ["matched", "idempotency key trigger:t1:1:abc", "job:"]
    assert yaml.safe_load("\n".join(line[2:] for line in lines[3:])) == reply.job


def test_test_of_an_event_that_does_not_pass_says_why():
    assert cli.tested_lines(TriggerTestReply(matched=False, reason="the filter is false")) == [
        "not matched: the filter is false"
    ]


# --- status: which rule started a job --------------------------------------------------------
@pytest.mark.parametrize(
    ("origin", "text"),
    [
        (
            JobOrigin(
                kind="event",
                rule="dataset-reindex",
                version=2,
                event="JM_EVENTS:1234",
                subject="jobmesh.v1.events.dataset.updated.books",
            ),
            "rule dataset-reindex v2 (event JM_EVENTS:1234 on jobmesh.v1.events.dataset.updated.books)",
        ),
        (
            JobOrigin(kind="batch", rule="b", version=1, event="JM_EVENTS:1..9", events=9),
            "rule b v1 (batch JM_EVENTS:1..9, 9 events)",
        ),
        (
            JobOrigin(kind="completion", rule="next", version=4, event="f" * 32, depth=2),
            f"rule next v4 (completion {'f' * 32}, chain depth 2)",
        ),
        (
            JobOrigin(kind="schedule", rule="nightly", version=1, event="tick:1700000000"),
            "rule nightly v1 (schedule tick:1700000000)",
        ),
        (JobOrigin(kind="api"), "api request"),
    ],
)
def test_status_says_which_rule_and_event_started_a_job(origin, text):
    assert render.origin_text(origin) == text
