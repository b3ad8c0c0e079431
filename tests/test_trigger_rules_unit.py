"""Rules without a cluster: CEL expressions and their cost guard, templates, subject
patterns, the complete check of a rule, and idempotency keys."""

from __future__ import annotations

import time

import msgspec
import pytest

from jobmesh.contract.messages.v1 import TriggerRecord, TriggerRule
from jobmesh.errors import InvalidMessage
from jobmesh.trigger.expressions import MAX_BUILT_LIST, Bindings, Expression, ExpressionError, comprehension_problem
from jobmesh.trigger.rules import (
    check_rule,
    compile_record,
    covers,
    event_variables,
    pattern_problem,
    subject_matches,
)
from jobmesh.trigger.templates import MAX_PLACEHOLDERS, JobTemplate, as_text

REINDEX = {
    "name": "dataset-reindex",
    "source": {"kind": "event", "subjects": ["jobmesh.v1.events.dataset.updated.*"]},
    "filter": "event.rows > 0",
    "job": {
        "name": "reindex {{ subject.tokens[5] }}",
        "priority": "{{ event.rows > 1000 ? 7 : 5 }}",
        "runtime": {
            "kind": "handler",
            "handler": "reindex",
            "input": {"dataset": "{{ subject.tokens[5] }}", "rows": "{{ event.rows }}"},
        },
    },
    "sample": {"subject": "jobmesh.v1.events.dataset.updated.books", "data": {"rows": 1200}},
}


def rule(data: dict) -> TriggerRule:
    return msgspec.convert(data, TriggerRule)


def bindings(subject: str, data, headers=None) -> Bindings:
    return Bindings(event_variables(subject, data, headers or {}, "JM_EVENTS:1", 0.0))


def refused(data: dict) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        check_rule(rule(data))
    return caught.value


def test_a_rule_is_checked_against_its_sample_and_yields_a_typed_job():
    compiled, spec = check_rule(rule(REINDEX))
    assert spec.name == "reindex books" and spec.priority == 7
    assert spec.runtime.input == {"dataset": "books", "rows": 1200}  # a whole placeholder keeps the number
    assert compiled.decide(bindings("jobmesh.v1.events.dataset.updated.x", {"rows": 0}), 0) is None  # filtered
    fired = compiled.decide(bindings("jobmesh.v1.events.dataset.updated.x", {"rows": 3}), 0)
    assert fired is not None and fired.name == "reindex x" and fired.priority == 5


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"filter": "event.rows >"}, "filter", "not a valid CEL expression"),
        ({"filter": "event.rows"}, "filter", "must give true or false"),
        ({"filter": "event.missing > 0"}, "filter", "no such field 'missing'"),
        ({"job": {"prority": 1, "runtime": {"kind": "noop"}}}, "job.prority", "unknown field"),
        ({"job": {"priority": "{{ event.rows }}", "runtime": {"kind": "noop"}}}, "job.priority", "<= 9"),
        ({"job": {"name": "{{ event.rows + 'a' }}", "runtime": {"kind": "noop"}}}, "job.name", "No such overload"),
        ({"source": {"kind": "event", "subjects": ["billing.>"]}}, "source.subjects[0]", "JOBMESH_TRIGGER_SUBJECTS"),
        ({"source": {"kind": "event", "subjects": ["jobmesh.v1.events.a.>.b"]}}, "source.subjects[0]", "last token"),
        ({"sample": None}, "sample", "required"),
        (
            {"sample": {"subject": "jobmesh.v1.events.other", "data": {}}},
            "sample.subject",
            "not a subject the rule watches",
        ),
        ({"job": {}}, "job", "may not be empty"),
        ({"debounce": {"seconds": 1}, "batch": {"max_events": 2}}, "batch", "one of debounce, batch and correlate"),
    ],
)
def test_a_bad_rule_is_refused_naming_the_field(change, field, words):
    error = refused({**REINDEX, **change})
    assert error.field == field, error
    assert words in str(error), error


def test_comprehensions_that_could_be_quadratic_are_refused_at_compile_time():
    assert comprehension_problem("events.map(e, e.data.i)") == ""
    assert comprehension_problem("event.items.filter(x, x > count).map(x, x * 2)") == ""
    assert comprehension_problem("events.exists(e, e.data.kind == 'event.items.all(')") == ""  # inside a string
    assert "inside another" in comprehension_problem("event.a.map(x, [x].all(y, y > 0))")
    for body_reads in (
        "event.items.all(x, x in event.items)",
        "event.m.all(k, headers[k] == 'a')",
        "event.items.all(x, !(x in subject.tokens))",
        "event.items.all(x, x > key)",
    ):
        assert "may read only its own variable" in comprehension_problem(body_reads), body_reads
    # A comment must not hide a body's read (a quote in it, or a break between "." and the name).
    assert comprehension_problem("event.items.all(x, // '\n x in event.items) // '")
    assert comprehension_problem("event.items.//\nall(x, x in event.items)")
    assert "not to a list built" in comprehension_problem("(event.items + event.items).map(x, x)")
    assert "at most 8" in comprehension_problem(" && ".join(["[1].all(x, x > 0)"] * 9))
    with pytest.raises(ExpressionError) as caught:
        Expression("event.items.all(x, x in event.items)", "filter")
    assert caught.value.field == "filter"
    eight = " && ".join(["event.a.all(x, x > 0)"] * 5)
    error = refused(
        {
            **REINDEX,
            "filter": eight,
            "job": {"name": "{{ string(event.a.exists(x, x > 1)) }}" * 4, "runtime": {"kind": "noop"}},
        }
    )
    assert "at most 8" in str(error) and error.field == "job"


def test_the_guard_keeps_a_large_event_cheap():
    large = bindings("s", {"items": list(range(30_000))})
    linear = Expression("event.items.all(x, x >= 0) && !event.items.exists(x, x < 0)", "filter")
    started = time.perf_counter()
    assert linear.test(large)
    assert time.perf_counter() - started < 1.0
    # map() and filter() are quadratic in cel-rust: refused on a list longer than a batch.
    builds = Expression("event.items.map(x, x * 2).size() > 0", "filter")
    with pytest.raises(ExpressionError, match="at most 1000 items; this event holds one of 30000"):
        builds.test(large)
    assert builds.test(bindings("s", {"items": list(range(MAX_BUILT_LIST))}))
    keys = Expression("size(event.m.map(k, k)) > 0", "filter")  # a map's keys count like a list's items
    with pytest.raises(ExpressionError, match="one of 2000"):
        keys.test(bindings("s", {"m": {str(i): i for i in range(2000)}}))


def test_templates_keep_types_when_whole_and_join_text_otherwise():
    template = JobTemplate(
        {"name": "n{{ event.n }}-{{ event.ok }}", "metadata": {"tags": "{{ event.tags }}"}, "x": ["{{ event.n }}", 1]}
    )
    rendered = template.render(bindings("s", {"n": 3, "ok": True, "tags": ["a", "b"]}))
    assert rendered == {"name": "n3-true", "metadata": {"tags": ["a", "b"]}, "x": [3, 1]}
    assert JobTemplate({"runtime": {"kind": "noop"}}).placeholders == 0
    assert as_text(None) == "" and as_text({"b": 1, "a": [1]}) == '{"a":[1],"b":1}'
    with pytest.raises(ExpressionError, match="at most"):
        JobTemplate(
            {"runtime": {"kind": "noop"}, "metadata": {f"k{i}": "{{ id }}" for i in range(MAX_PLACEHOLDERS + 1)}}
        )


def test_subject_patterns():
    assert (
        pattern_problem("a.*.>") == ""
        and pattern_problem("a..b")
        and pattern_problem("a.b*")
        and pattern_problem("a b")
    )
    assert subject_matches(("a", "*", ">"), ("a", "b", "c", "d")) and not subject_matches(("a", "*"), ("a",))
    assert (
        covers(("a", ">"), ("a", "*", "c"))
        and not covers(("a", "*"), ("a", ">"))
        and not covers(("a", "b"), ("a", "*"))
    )


def test_the_idempotency_key_names_the_rule_its_version_and_the_event():
    compiled = compile_record(TriggerRecord(rule=rule(REINDEX), version=3))
    assert compiled.idempotency_key("JM_EVENTS:42") == "trigger:dataset-reindex:3:JM_EVENTS:42"
    long = compiled.idempotency_key("id:" + "x" * 500)
    assert len(long) < 100 and long == compiled.idempotency_key("id:" + "x" * 500)  # hashed, still deterministic


async def test_an_event_a_burst_rule_filters_out_counts_as_filtered_not_held():
    from jobmesh.trigger.bursts import Bursts
    from jobmesh.trigger.router import Incoming, Router
    from jobmesh.trigger.ruleset import RuleSet
    from jobmesh.trigger.stats import RuleStats

    stats = RuleStats(None, "t")
    batch = {**REINDEX, "batch": {"max_events": 10}}
    compiled = compile_record(TriggerRecord(rule=rule(batch), version=1, created_at=1.0))
    rules = RuleSet(None)
    rules.apply(compiled.name, msgspec.json.encode(compiled.record))
    router = Router(None, stats, Bursts(None, None, stats, rules))  # type: ignore[arg-type]
    variables = event_variables("jobmesh.v1.events.dataset.updated.x", {"rows": 0}, {}, "JM_EVENTS:1", 0.0)
    routed = await router.route(
        [Incoming("event", variables, "JM_EVENTS:1", "jobmesh.v1.events.dataset.updated.x", [compiled])]
    )
    assert (routed.held, routed.filtered, routed.failures) == (0, 1, [])


def test_a_burst_state_nested_too_deeply_reads_as_corrupt_not_a_crash():
    from jobmesh.trigger.bursts import Bursts

    assert Bursts._decode("pending.r.k", b"[" * 5000 + b"]" * 5000) is None
