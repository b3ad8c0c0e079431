"""Schedules: when a schedule rule's ticks fall, and which of them to fire now.

Pure functions of a :class:`ScheduleSource` and times passed in (unix seconds); the
ticker (:mod:`jobmesh.trigger.ticker`) does the sleeping, the state and the firing.

What we accept:

* ``cron``: five fields (minute hour day-of-month month day-of-week), or six with the
  SECONDS FIRST (``second minute hour day-of-month month day-of-week``), or an alias
  (``@yearly``, ``@monthly``, ``@weekly``, ``@daily``, ``@hourly``, ``@midnight``). croniter
  7 on its own reads a sixth field as seconds *last*; we pass ``second_at_beginning`` for a
  six-field expression so that ``*/10 * * * * *`` means every ten seconds. Seven fields (a
  year) and Jenkins-style ``H`` are refused. When both day-of-month and day-of-week are
  restricted, a day matching either fires (classic cron). An expression that never matches
  (``0 0 31 2 *``) is refused.
* ``every``: a period of at least one second. Ticks fall on whole multiples of the period
  since the unix epoch, so every replica computes the same ticks without talking to the
  others, and a restart does not shift them.
* ``timezone``: an IANA name (``Europe/Berlin``); cron fields are read in local time. A
  local time skipped by a DST change fires at the first instant after the gap (02:30 on
  the spring-forward night fires at 03:00); a local time that occurs twice in the
  fall-back night fires at both instants (croniter's reading). ``every`` ignores the zone.
"""

from __future__ import annotations

import math
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter  # type: ignore[import-untyped]  # croniter ships no types

from jobmesh.contract.messages.v1 import ScheduleSource

__all__ = ["GRACE_MIN", "due_ticks", "latest_tick", "next_tick", "period_near", "schedule_problem"]

# A tick is "on time" when it is at most this old, or a tenth of the schedule's period if
# that is longer: a replica that wakes a little late (a busy loop, a slow KV read) still
# fires it, even under ``missed: skip``.
GRACE_MIN = 2.0
# Under ``skip`` the on-time ticks are at most GRACE/period + 1 of them (period >= 1 s), so
# this bound is never reached by a valid schedule; it only caps the work.
_SKIP_SCAN_MAX = 8


def schedule_problem(source: ScheduleSource) -> tuple[str, str] | None:
    """Why a schedule cannot run, or None when it can.

    Args:
        source: the rule's schedule.

    Returns:
        ``(field, reason)`` with field one of ``cron``, ``every`` and ``timezone``; None
        when the schedule is valid.
    """
    cron = source.cron.strip()
    if cron and source.every:
        return "every", "a schedule takes one of cron and every, not both"
    if not cron and not source.every:
        return "cron", "a schedule needs cron (an expression) or every (seconds)"
    if not cron and source.every < 1:
        return "every", f"must be at least 1 second, got {source.every:g}"
    try:
        zone = _zone(source.timezone)
    except ValueError as exc:
        return "timezone", str(exc)
    if cron:
        fields = cron.split()
        if cron.startswith("@"):
            if len(fields) != 1:
                return "cron", f"{cron!r}: an alias such as @daily stands alone"
        elif len(fields) not in (5, 6):
            return "cron", (
                f"{cron!r} has {len(fields)} fields: give five (minute hour day-of-month month day-of-week) "
                "or six with the seconds first (second minute hour day-of-month month day-of-week)"
            )
        if not croniter.is_valid(cron, second_at_beginning=len(fields) == 6):
            return "cron", f"{cron!r} is not a cron expression"
        try:
            _cron(cron, zone, 0.0).get_next(float)
        except (CroniterError, ValueError, OverflowError):
            return "cron", f"{cron!r} never matches a date"
    return None


def next_tick(source: ScheduleSource, after: float) -> float:
    """The first tick strictly after ``after``.

    Args:
        source: a valid schedule (:func:`schedule_problem` said None).
        after: unix seconds.

    Returns:
        The tick, in unix seconds.
    """
    cron = source.cron.strip()
    if not cron:
        every = source.every
        tick = float((math.floor(after / every) + 1) * every)
        return tick if tick > after else tick + every  # float rounding at a multiple
    return float(_cron(cron, _zone(source.timezone), after).get_next(float))


def latest_tick(source: ScheduleSource, at: float) -> float:
    """The last tick at or before ``at``.

    Args:
        source: a valid schedule.
        at: unix seconds.

    Returns:
        The tick, in unix seconds.
    """
    cron = source.cron.strip()
    if not cron:
        every = source.every
        tick = float(math.floor(at / every) * every)
        return tick if tick <= at else tick - every
    it = _cron(cron, _zone(source.timezone), at)
    before = float(it.get_prev(float))  # croniter's get_prev is strictly before
    then = next_tick(source, before)
    return then if then <= at else before


def period_near(source: ScheduleSource, tick: float) -> float:
    """How long after ``tick`` the next tick falls (a cron's period varies)."""
    return next_tick(source, tick) - tick


def grace_of(source: ScheduleSource, tick: float) -> float:
    """How old ``tick`` may be and still count as on time."""
    return max(GRACE_MIN, period_near(source, tick) / 10)


def due_ticks(source: ScheduleSource, last_fired: float | None, now: float) -> list[float]:
    """The ticks to fire now, oldest first.

    The candidates are the ticks in ``(last_fired, now]``. Under ``missed: catch_up`` the
    latest ``catch_up_max`` of them fire, however old. Under ``missed: skip`` only the
    on-time ones fire: a tick at most ``max(2 s, a tenth of the period)`` old; after
    downtime the rest are dropped, so a replica that is on time still fires the current
    tick and one that comes back after an hour does not fire the hour's ticks.

    The work is bounded whatever the gap: ``every`` is arithmetic, and a cron walks back
    from ``now`` at most ``catch_up_max + 1`` ticks (a few under ``skip``).

    Args:
        source: a valid schedule.
        last_fired: the last tick fired (or the rule's creation, or its resumption: the
            ticker's baseline); None for a rule with no baseline at all, which fires none
            of the past ticks (the first is the next one after ``now``).
        now: unix seconds.

    Returns:
        The ticks to fire, ascending (empty when none is due).
    """
    if last_fired is None or now <= last_fired:
        return []
    latest = latest_tick(source, now)
    if latest <= last_fired:
        return []
    if source.missed == "catch_up":
        limit = source.catch_up_max
        oldest_ok = -math.inf
    else:
        limit = _SKIP_SCAN_MAX
        oldest_ok = now - grace_of(source, latest)
        if latest < oldest_ok:
            return []
    cron = source.cron.strip()
    ticks: list[float] = []
    if not cron:
        every = source.every
        k_latest = round(latest / every)
        k_first = math.floor(last_fired / every) + 1  # the first multiple after last_fired
        k_from = max(k_first, k_latest - limit + 1)
        for k in range(k_from, k_latest + 1):
            tick = float(k * every)
            if last_fired < tick <= now and tick >= oldest_ok:
                ticks.append(tick)
        return ticks
    it = _cron(cron, _zone(source.timezone), latest)
    tick = latest
    while tick > last_fired and tick >= oldest_ok and len(ticks) < limit:
        ticks.append(tick)
        tick = float(it.get_prev(float))
    ticks.reverse()
    return ticks


# --- croniter and zoneinfo -----------------------------------------------------------
@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    """The zone of that IANA name.

    Raises:
        ValueError: no such zone (the reason names it).
    """
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"{name!r} is not a time zone (an IANA name such as UTC or Europe/Berlin)") from exc


def _cron(expr: str, zone: ZoneInfo, at: float) -> croniter:
    """A croniter over ``expr`` in ``zone`` positioned at ``at``.

    The start is a zone-aware datetime: croniter then steps in local wall-clock time and
    converts each match back to an instant, which is what makes DST changes right.
    """
    six = not expr.startswith("@") and len(expr.split()) == 6
    return croniter(expr, datetime.fromtimestamp(at, zone), second_at_beginning=six)
