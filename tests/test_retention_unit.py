"""Pure decisions of bounded growth: what history is old, which nodes are gone for good,
and the settings that tie the idempotency window to the history."""

from __future__ import annotations

import pytest

from jobmesh.binder.reaping import NodeSnapshot, gone_for_good, node_of_durable
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.settings import Settings
from jobmesh.tracker.retention import prune_cutoff, purges_logs

DAY = 86_400.0
NOW = 1_700_000_000.0


def test_cutoff_is_now_minus_retention():
    assert prune_cutoff(NOW, 30 * DAY) == NOW - 30 * DAY


def test_logs_are_purged_only_when_history_is_shorter_than_the_log_stream():
    assert purges_logs(DAY, logs_max_age=7 * DAY)
    assert not purges_logs(7 * DAY, logs_max_age=7 * DAY)
    assert not purges_logs(30 * DAY, logs_max_age=7 * DAY)


def snap(alive=(), stale=None, reservations=None, consumers=()):
    return NodeSnapshot(
        alive=frozenset(alive),
        last_heartbeat=stale or {},
        reservations=reservations or {},
        consumers=frozenset(consumers),
    )


def test_a_node_absent_for_less_than_the_grace_is_kept_and_remembered():
    doomed, since = gone_for_good(NOW, DAY, snap(reservations={"n1": 0}, consumers=["n1"]), {})
    assert doomed == []
    assert since == {"n1": NOW}


def test_a_node_absent_past_the_grace_with_nothing_reserved_is_gone():
    doomed, _ = gone_for_good(NOW, DAY, snap(reservations={"n1": 0}, consumers=["n1"]), {"n1": NOW - DAY})
    assert doomed == ["n1"]


def test_a_node_with_reservations_is_never_gone():
    doomed, since = gone_for_good(NOW, DAY, snap(reservations={"n1": 2}), {"n1": NOW - 10 * DAY})
    assert doomed == []
    assert since == {"n1": NOW - 10 * DAY}


def test_an_alive_node_is_forgotten_and_kept():
    doomed, since = gone_for_good(NOW, DAY, snap(alive=["n1"], consumers=["n1"]), {"n1": NOW - 10 * DAY})
    assert doomed == []
    assert since == {}


def test_a_stale_record_dates_the_absence_from_its_last_heartbeat():
    # Seen for the first time now, but its record says it stopped beating two days ago.
    doomed, since = gone_for_good(NOW, DAY, snap(stale={"n1": NOW - 2 * DAY}, consumers=["n1"]), {})
    assert doomed == ["n1"]
    assert since == {"n1": NOW - 2 * DAY}


def test_a_consumer_without_a_record_counts_as_a_node():
    doomed, _ = gone_for_good(NOW, DAY, snap(consumers=["n9"]), {"n9": NOW - DAY - 1})
    assert doomed == ["n9"]


def test_dispatch_durables_name_their_node():
    assert node_of_durable("executor-node-a") == "node-a"
    assert node_of_durable("tracker-dispatch") is None
    assert node_of_durable("executor-") is None


def test_the_idempotency_window_follows_the_history_when_unset():
    s = Settings.from_env("scheduler", {"JOBMESH_HISTORY_RETENTION_SECONDS": "3600"})
    assert s.done_retention_seconds == 3600 + s.retention_interval_seconds
    defaults = Settings.from_env("scheduler", {})
    assert defaults.history_retention_seconds == 30 * DAY
    assert defaults.node_grace_seconds == DAY
    assert defaults.done_retention_seconds >= defaults.history_retention_seconds


def test_a_window_shorter_than_the_history_is_refused_naming_both_variables():
    with pytest.raises(InvalidSpec) as err:
        Settings.from_env(
            "scheduler",
            {"JOBMESH_HISTORY_RETENTION_SECONDS": str(30 * DAY), "JOBMESH_DONE_RETENTION_SECONDS": str(DAY)},
        )
    assert "JOBMESH_DONE_RETENTION_SECONDS" in str(err.value)
    assert "JOBMESH_HISTORY_RETENTION_SECONDS" in str(err.value)
    assert err.value.field == "done_retention_seconds"


def test_a_window_at_least_the_history_plus_a_round_is_taken():
    s = Settings.from_env(
        "scheduler",
        {
            "JOBMESH_HISTORY_RETENTION_SECONDS": "3600",
            "JOBMESH_RETENTION_INTERVAL_SECONDS": "60",
            "JOBMESH_DONE_RETENTION_SECONDS": "3660",
        },
    )
    assert s.done_retention_seconds == 3660


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JOBMESH_HISTORY_RETENTION_SECONDS", "10"),
        ("JOBMESH_NODE_GRACE_SECONDS", "5"),
        ("JOBMESH_RETENTION_BATCH", "0"),
        ("JOBMESH_RETENTION_INTERVAL_SECONDS", "0"),
    ],
)
def test_bad_retention_settings_name_their_variable(name, value):
    with pytest.raises(InvalidSpec) as err:
        Settings.from_env("tracker", {name: value})
    assert name in str(err.value)
