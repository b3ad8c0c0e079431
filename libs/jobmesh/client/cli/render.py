"""Everything the ``jobmesh`` command prints: tables, a job's timeline, progress, JSON.

Results go to stdout; diagnostics and progress go to stderr, so that with ``--json`` stdout
holds only JSON. Output is plain text (no colour, no terminal control), the same whether
stdout is a terminal or a pipe, so scripts and tests read what a person reads. The one
exception is the live progress bar of ``run`` and ``watch`` on a terminal (``display``),
which prints these same lines above the bar.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from jobmesh.client.client import CancelOutcome, ClusterSettings
from jobmesh.client.deadletters import DeadLetterPage, Replayed
from jobmesh.client.jobstate import Progress, Seen
from jobmesh.client.timeline import Step, job_notes, last_refusal, timeline
from jobmesh.contract.messages.v1 import (
    HealthReply,
    JobOrigin,
    JobSummary,
    JobView,
    LogLine,
    MemberView,
    NodeInfo,
    NodeView,
    QueueConfig,
    QueueStats,
    SubmitReply,
    TenantConfig,
    Timeouts,
    ZoneMap,
)

_encoder = msgspec.json.Encoder()
PREFIX = "jobmesh: "
# States that end an attempt without ending the job while a retry may follow: their line
# says "final" once the scheduler has given up.
_MAY_RETRY = frozenset({"failed", "lost"})
# How much of a dead letter's reason fits on its row of the table.
_REASON_WIDTH = 100


def err(message: str) -> None:
    """Print one diagnostic line on stderr, prefixed with ``jobmesh:``.

    Args:
        message: the line.
    """
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)


def json_out(value: Any) -> None:
    """Print ``value`` as one line of JSON on stdout.

    Args:
        value: a message struct or builtin data.
    """
    sys.stdout.write(_encoder.encode(value).decode() + "\n")


def when(ts: float | None) -> str:
    """A timestamp as local ``HH:MM:SS.mmm``, ``-`` when there is none.

    Args:
        ts: seconds since the epoch, or None.

    Returns:
        The text.
    """
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: frozenset[int] = frozenset()) -> None:
    """Print rows in columns as wide as their widest cell; the last column is not padded.

    Args:
        headers: the column titles.
        rows: the cells of each row, as text.
        right: indexes of the columns aligned to the right (numbers).
    """
    for line in table_lines(headers, rows, right):
        print(line)


def table_lines(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: frozenset[int] = frozenset()
) -> list[str]:
    """The lines ``table`` prints, for output that indents a table under a heading.

    Args:
        headers: the column titles.
        rows: the cells of each row, as text.
        right: indexes of the columns aligned to the right (numbers).

    Returns:
        The header line and one line per row.
    """
    cells = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else (cell if i == len(row) - 1 else cell.ljust(widths[i]))
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def detail(seen: Seen) -> str:
    """The parenthesised detail of a state: node, exit code, reason (`` (node a, exit code 3)``).

    A failed or lost attempt that ended the job says ``final`` first; a later attempt
    than the first says which.

    Args:
        seen: the state as resolved by ``jobstate``.

    Returns:
        The text, "" when there is nothing to add.
    """
    parts = []
    if seen.final and seen.state in _MAY_RETRY:
        parts.append("final")
    if seen.attempt > 1:
        parts.append(f"attempt {seen.attempt}")
    if seen.node_id:
        parts.append(f"node {seen.node_id}")
    if seen.exit_code is not None:
        parts.append(f"exit code {seen.exit_code}")
    if seen.reason:
        parts.append(seen.reason)
    return f" ({', '.join(parts)})" if parts else ""


# --- submit and run --------------------------------------------------------------------
def submitted(reply: SubmitReply, as_json: bool) -> None:
    """What ``submit`` prints: the job id (or JSON with the duplicate flag).

    Args:
        reply: the trigger's reply for one job.
        as_json: print JSON.
    """
    if as_json:
        json_out({"job_id": reply.job_ids[0], "duplicate": reply.duplicates[0]})
    else:
        print(reply.job_ids[0])


def uploaded_line(files: int, total: int, sent: int) -> str:
    """The line that says what went to ``jm_uploads`` before a submit.

    Args:
        files: how many uploads.
        total: their bytes.
        sent: the bytes sent (the rest the bucket held already, by content).

    Returns:
        ``uploaded 2 files (1.5 MiB; 0.5 MiB already stored)``.
    """
    stored = total - sent
    extra = f"; {size_text(stored)} already stored" if stored else ""
    return f"uploaded {files} file{'s' if files != 1 else ''} ({size_text(total)}{extra})"


def size_text(n: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``64.0 MiB``.

    Args:
        n: bytes.

    Returns:
        The text.
    """
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def run_submitted(job_id: str) -> None:
    """The first line ``run`` prints on stderr (scripts read the job id from it).

    Args:
        job_id: the job's id.
    """
    err(f"job {job_id} submitted")


def state_line(elapsed: float, seen: Seen) -> str:
    """One line of ``run``'s and ``watch``'s timeline: ``[  1.20s] running (node a)``.

    Args:
        elapsed: seconds since the command began following the job.
        seen: the state shown.

    Returns:
        The line, without the ``jobmesh:`` prefix.
    """
    return f"[{elapsed:6.2f}s] {seen.state}{detail(seen)}"


def percent(fraction: float) -> str:
    """A fraction done as a whole percentage (``50%``); values outside 0..1 are clamped.

    Args:
        fraction: how much is done.

    Returns:
        The text.
    """
    return f"{round(min(1.0, max(0.0, fraction)) * 100):d}%"


def progress_line(elapsed: float, progress: Progress) -> str:
    """The line that says what a running attempt reported: ``[  2.00s] progress 50% half``.

    Args:
        elapsed: seconds since the command began following the job.
        progress: what the attempt's lease carries.

    Returns:
        The line, without the ``jobmesh:`` prefix.
    """
    parts = [percent(progress.fraction)] if progress.fraction is not None else []
    if progress.message:
        parts.append(progress.message)
    return f"[{elapsed:6.2f}s] progress {' '.join(parts)}".rstrip()


def bar_description(seen: Seen) -> str:
    """The words beside the live progress bar: the state and where (``running on a``).

    Args:
        seen: the state shown.

    Returns:
        The text.
    """
    where = f" on {seen.node_id}" if seen.node_id else ""
    attempt = f" (attempt {seen.attempt})" if seen.attempt > 1 else ""
    return f"{seen.state}{where}{attempt}"


def log_line(line: LogLine) -> None:
    """A job's output line, to stdout or stderr as the job wrote it.

    Args:
        line: one line of the job's output.
    """
    print(line.line, file=sys.stdout if line.stream == "stdout" else sys.stderr, flush=True)


def job_ended(view: JobView) -> None:
    """What ``watch`` says when it starts on a job that has already ended.

    Args:
        view: the job's final view.
    """
    err(f"job {view.job_id} already ended {view.state}" + (f" ({view.reason})" if view.reason else ""))


def still_running(job_id: str, submitted: bool) -> None:
    """What ``run`` says on Ctrl-C: the job goes on, and how to follow it.

    Args:
        job_id: the job's id.
        submitted: whether the trigger had confirmed the submit.
    """
    if submitted:
        err(f"interrupted; job {job_id} keeps running in the cluster")
    else:
        err(f"interrupted before the submit was confirmed; job {job_id} may or may not exist")
    err(f"follow it with: jobmesh status {job_id}   or   jobmesh logs -f {job_id}")


# --- status and list -------------------------------------------------------------------
def job_status(view: JobView, seen: Seen, as_json: bool, fallback: JobView | None = None) -> None:
    """What ``status`` prints: the job, its resolved state, its attempts as a timeline, events.

    Args:
        view: the tracker's view.
        seen: the state a person should see (from ``jobstate``).
        as_json: print the view as JSON, with the resolved state and reason and the run
            timeout in effect (``run_timeout``, seconds).
        fallback: the view of the job that ran in its place, when there is one and the
            tracker knows it.
    """
    if as_json:
        out = msgspec.to_builtins(view)
        out["state"], out["reason"] = seen.state, seen.reason
        # The spec omits defaults on the wire; the timeout in effect is worth saying.
        out["run_timeout"] = view.spec.timeouts.run
        json_out(out)
        return
    print(f"job      {view.job_id}  {view.name}")
    print(f"state    {seen.state}" + (f" ({seen.reason})" if seen.reason else ""))
    refusal = last_refusal(view)
    if refusal is not None and refusal.detail not in seen.reason:
        # Released again, the scheduler only says so: the binder's refusal is what it waits on.
        print(f"refused  {refusal.detail} ({when(refusal.at)})")
    print(f"final    {'yes' if view.final else 'no'}")
    print(f"queue    {view.queue}  tenant {view.tenant}  priority {view.spec.priority}")
    print(f"node     {view.node_id or '-'}   attempt {view.attempt}")
    print(f"timeouts {timeouts_text(view.spec.timeouts)}")
    print(f"submitted {when(view.submitted_at)}  updated {when(view.updated_at)}")
    if view.spec.replicas > 1:
        same = f", all with the same {view.spec.same}" if view.spec.same else ""
        print(f"gang     {view.spec.replicas} members, one per node{same}")
    if view.origin is not None:
        print(f"started by: {origin_text(view.origin)}")
    if view.fallback_of:
        print(f"runs in place of {view.fallback_of}")
    if view.fallback_job_id:
        print(f"fallback {view.fallback_job_id}  {_fallback_state(fallback)}")
    notes = job_notes(view)
    steps = timeline(view)
    if steps or notes:
        print("attempts:")
    for note in notes:
        print(f"  -  {note}")
    tails = {a.attempt: a.output_tail for a in view.attempts}
    for step in steps:
        for line in timeline_lines(step):
            print(line)
        if tails.get(step.attempt):
            for line in tails[step.attempt].rstrip("\n").splitlines()[-10:]:
                print(f"      | {line}")
    if view.events:
        print("events:")
        for e in view.events:
            print(f"  {when(e.at)}  #{e.attempt} {e.kind}" + (f"  {e.detail}" if e.detail else ""))


def origin_text(origin: JobOrigin) -> str:
    """What started a triggered job, as ``status`` says it after ``started by:``.

    Args:
        origin: the job's origin (``JobView.origin``).

    Returns:
        ``rule dataset-reindex v2 (event JM_EVENTS:1234 on jobmesh.v1.events.dataset.updated.books)``;
        a batch adds how many events it stands for, a completion chain its depth.
    """
    if not origin.rule:
        return f"{origin.kind} request"
    about = [f"{origin.kind} {origin.event}".rstrip()]
    if origin.subject:
        about[0] += f" on {origin.subject}"
    if origin.events > 1:
        about.append(f"{origin.events} events")
    if origin.depth:
        about.append(f"chain depth {origin.depth}")
    version = f" v{origin.version}" if origin.version else ""
    return f"rule {origin.rule}{version} ({', '.join(about)})"


def timeouts_text(timeouts: Timeouts) -> str:
    """The timeouts in effect for a job, as ``status`` shows them (defaults said so).

    Args:
        timeouts: the job's timeouts.

    Returns:
        ``run 3600s (default), heartbeat 10s (default)`` plus queue and total when set.
    """
    default = Timeouts()
    parts = []
    for name in ("run", "heartbeat", "queue", "total"):
        value = getattr(timeouts, name)
        if name in ("queue", "total") and not value:
            continue  # 0: none
        parts.append(f"{name} {value:g}s" + (" (default)" if value == getattr(default, name) else ""))
    return ", ".join(parts)


def _fallback_state(fallback: JobView | None) -> str:
    if fallback is None:
        return "(not recorded by the tracker yet)"
    return (
        f"{fallback.state}"
        + (", final" if fallback.final else "")
        + (f" ({fallback.reason})" if fallback.reason else "")
    )


def timeline_lines(step: Step) -> list[str]:
    """The lines of one attempt in ``status``'s timeline.

    The first line says how it ended, where, when and for how long; the lines below say
    why (its error or reason), where its result is, and what followed (a retry after a
    backoff, giving up, a cancel).

    Args:
        step: the attempt, from ``timeline``.

    Returns:
        The lines, indented under ``attempts:``.
    """
    times = f"  {when(step.started_at)}" if step.started_at else ""
    if step.finished_at:
        times += f" -> {when(step.finished_at)}"
    ran = step.ran_for
    span = f" ({ran:.2f}s)" if ran is not None else ""
    code = "" if step.exit_code is None else f"  exit {step.exit_code}"
    lines = [f"  #{step.attempt}  {step.state:10} {step.node_id or '-'}{times}{span}{code}".rstrip()]
    if step.error:
        lines.append(f"      error: {step.error}")
    elif step.reason:
        lines.append(f"      reason: {step.reason}")
    if step.result:
        lines.append(f"      result: {step.result}")
    if step.retry:
        waited = f" (the next attempt was released {step.waited:.2f}s later)" if step.waited is not None else ""
        lines.append(f"      retry: {step.retry}{waited}")
    lines.extend(f"      {note}" for note in step.notes)
    lines.extend(member_lines(step.members))
    return lines


def member_lines(members: Sequence[MemberView]) -> list[str]:
    """The lines of a gang's members under their attempt: rank, node, state, and why a
    member failed or was lost.

    Args:
        members: the attempt's members, by rank (``AttemptView.members``).

    Returns:
        ``      member 2  n3  failed     exit: exited with 7 (exit 7)``, one per member;
        none for a plain job.
    """
    if not members:
        return []
    ranks = max(len(str(m.rank)) for m in members)
    nodes = max(len(m.node_id or "-") for m in members)
    states = max(len(m.state) for m in members)
    return [
        f"      member {m.rank:>{ranks}}  {m.node_id or '-':{nodes}}  {m.state:{states}}  {m.detail}".rstrip()
        for m in members
    ]


def job_list(rows: Sequence[tuple[JobSummary, Seen]], as_json: bool) -> None:
    """What ``list`` prints: one row per job with the state ``status`` would show.

    Args:
        rows: each job with its resolved state.
        as_json: print a JSON list of summaries (state resolved, reason added).
    """
    if as_json:
        out = []
        for job, seen in rows:
            item = msgspec.to_builtins(job)
            item["state"], item["reason"] = seen.state, seen.reason
            out.append(item)
        json_out(out)
        return
    print(f"{'JOB':32}  {'STATE':10} {'QUEUE':10} {'NODE':12} {'EXIT':>4}  {'SUBMITTED':12}  NAME")
    for j, seen in rows:
        code = "" if j.exit_code is None else str(j.exit_code)
        print(
            f"{j.job_id:32}  {seen.state:10} {j.queue:10} {j.node_id or '-':12} {code:>4}  "
            f"{when(j.submitted_at):12}  {j.name}"
        )


# --- cancel, results, dead letters -----------------------------------------------------
def cancelled(outcome: CancelOutcome, as_json: bool) -> None:
    """What ``cancel`` prints: what happened to the job.

    Args:
        outcome: the client's answer.
        as_json: print it as JSON.
    """
    if as_json:
        json_out(outcome)
    elif outcome.state == "cancelled":
        print(f"job {outcome.job_id} cancelled" + (f": {outcome.message}" if outcome.message else ""))
    elif outcome.state == "cancelling":
        print(f"job {outcome.job_id} is being cancelled: {outcome.message or 'its attempt is being stopped'}")
    else:
        print(f"job {outcome.job_id} {outcome.message}; nothing to cancel")


def dead_letters(page: DeadLetterPage, as_json: bool) -> None:
    """What ``dead-letters`` prints: one row per refused message, oldest first.

    Args:
        page: the dead letters read.
        as_json: print a JSON list of ``{"seq", ...the dead letter}``.
    """
    if as_json:
        json_out([{"seq": e.seq, **msgspec.to_builtins(e.letter)} for e in page.entries])
    else:
        rows = [
            [
                str(e.seq),
                when(e.letter.at),
                e.letter.service,
                e.letter.code,
                e.letter.subject,
                _one_line(e.letter.reason, _REASON_WIDTH),
            ]
            for e in page.entries
        ]
        table(["SEQ", "AT", "SERVICE", "CODE", "SUBJECT", "REASON"], rows, right=frozenset({0}))
        if not page.entries:
            err("no dead letters")
    if page.unreadable:
        err(f"{page.unreadable} record(s) on the dead-letter subjects are not dead letters; skipped")


def replayed(done: Replayed, as_json: bool) -> None:
    """What ``dead-letters replay`` prints.

    Args:
        done: what the replay did.
        as_json: print it as JSON.
    """
    if as_json:
        json_out(done)
    elif done.duplicate:
        print(f"dead letter {done.seq} was replayed already ({done.stream} seq {done.stream_seq}); nothing was sent")
    else:
        print(f"dead letter {done.seq} replayed to {done.subject} ({done.stream} seq {done.stream_seq})")


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# --- cluster views ---------------------------------------------------------------------
def nodes(views: Sequence[NodeView], now: float, as_json: bool) -> None:
    """What ``nodes`` prints: capacity, allocation, isolation and network, then each node's details.

    The table has one row per node: state, isolation level, network, cpu, memory, gpu and
    disk (used/capacity), jobs, zone, heartbeat, datasets, labels. Below it, per node:
    its runtimes and handlers, each GPU device and what the executor's probe found.

    Args:
        views: the binder's nodes.
        now: the current time, for the heartbeat age.
        as_json: print the views as JSON (``node.isolation``, ``node.network``,
            ``node.gpu_devices`` and ``node.probe`` included).
    """
    if as_json:
        json_out(views)
        return
    rows = []
    for v in views:
        n, a = v.node, v.allocated
        state = "draining" if n.draining else ("alive" if v.alive else "gone")
        gpu = f"{a.gpu}/{n.gpu}" + (f" {n.gpu_kind}" if n.gpu_kind else "")
        rows.append(
            [
                n.node_id,
                state,
                n.isolation,
                "yes" if n.network else "no",
                f"{a.cpu_milli}/{n.cpu_milli}",
                f"{a.memory_mb}/{n.memory_mb}",
                gpu,
                f"{a.disk_mb}/{n.disk_mb}",
                str(v.reservations),
                n.zone or "-",
                f"{now - n.heartbeat_at:.1f}s",
                ",".join(n.datasets) or "-",
                ",".join(f"{k}={val}" for k, val in sorted(n.labels.items())) or "-",
            ]
        )
    table(
        [
            "NODE",
            "STATE",
            "ISOLATION",
            "NET",
            "CPU (m) used/cap",
            "MEM (MiB) used/cap",
            "GPU",
            "DISK (MiB) used/cap",
            "JOBS",
            "ZONE",
            "HEARTBEAT",
            "DATASETS",
            "LABELS",
        ],
        rows,
        right=frozenset({4, 5, 6, 7, 8, 10}),
    )
    if not views:
        err("no executor node has registered")
        return
    print("details:")
    for v in views:
        for line in node_details(v.node):
            print(line)


def node_details(node: NodeInfo) -> list[str]:
    """The lines under ``nodes``' table for one node: runtimes, handlers, GPUs, probe findings.

    Args:
        node: the node's record.

    Returns:
        The lines, indented (the first names the node).
    """
    handlers = ",".join(node.handlers) or "-"
    lines = [f"  {node.node_id}  runtimes {','.join(node.runtimes) or '-'}  handlers {handlers}"]
    for d in node.gpu_devices:
        memory = f"  {d.memory_mb} MiB" if d.memory_mb else ""
        lines.append(f"    gpu {d.index}  {d.kind or '-'}{memory}" + (f"  {d.uuid}" if d.uuid else ""))
    for key, found in sorted(node.probe.items()):
        lines.append(f"    probe {key}: {found}")
    if not node.probe:
        lines.append("    probe: (none reported: an executor from before probing)")
    return lines


def waiting_text(waiting: dict[str, int]) -> str:
    """What held jobs wait for, as ``reason (count)``, most common first.

    The keys are whatever the scheduler sends (a reason in words, or a place in its
    backlog from older schedulers); they are shown as they come.

    Args:
        waiting: reason -> number of jobs.

    Returns:
        ``reason (count); ...``, or ``-`` when nothing waits.
    """
    ordered = sorted(((n, why) for why, n in waiting.items() if n), key=lambda item: (-item[0], item[1]))
    return "; ".join(f"{why} ({n})" for n, why in ordered) or "-"


def queue_waiting(stats: QueueStats) -> str:
    """The WAITING cell of ``queues``: why the queue's held jobs wait, with counts.

    A scheduler that words its reasons sends them in ``reasons``; an older one counts jobs
    by the place it holds them in ``waiting``. Jobs in the ready place only wait for their
    turn, which PENDING already counts.

    Args:
        stats: one queue's stats.

    Returns:
        ``reason (count); ...``, or ``-``.
    """
    if stats.reasons:
        return waiting_text(stats.reasons)
    return waiting_text({why: n for why, n in stats.waiting.items() if why != "ready"})


def queues(rows: Sequence[tuple[int, str, QueueStats]], as_json: bool) -> None:
    """What ``queues`` prints: depth, in flight, regulation, pending per tenant, why jobs wait.

    Args:
        rows: ``(partition, owner, stats)`` per queue, in display order.
        as_json: print a JSON list (partition and owner beside each queue's stats).
    """
    if as_json:
        json_out([{"partition": part, "owner": owner, **msgspec.structs.asdict(q)} for part, owner, q in rows])
        return
    print(f"{'QUEUE':16} {'PENDING':>8} {'IN FLIGHT':>9} {'RATE':>7} {'CAP':>5}  {'TENANTS (pending)':30} WAITING")
    for _part, _owner, q in rows:
        tenants = ", ".join(f"{t}={n}" for t, n in sorted(q.tenants.items())) or "-"
        rate = f"{q.rate:g}/s" if q.rate else "-"
        cap = str(q.max_in_flight) if q.max_in_flight else "-"
        print(f"{q.queue:16} {q.pending:>8} {q.in_flight:>9} {rate:>7} {cap:>5}  {tenants:30} {queue_waiting(q)}")
    if not rows:
        err("no queue has seen a job yet")


def health(reply: HealthReply, as_json: bool) -> None:
    """What ``health`` prints.

    Args:
        reply: the service's answer.
        as_json: print it as JSON.
    """
    if as_json:
        json_out(reply)
    else:
        print(f"{reply.service} {reply.instance}: {'ok' if reply.ok else 'NOT OK'} ({reply.detail})")


# --- configuration ---------------------------------------------------------------------
def queue_set(name: str, config: QueueConfig) -> None:
    """What ``queue set`` says on stderr once the value is stored.

    Args:
        name: the queue.
        config: what it was set to.
    """
    err(
        f"queue {name}: rate {config.rate:g}/s, burst {config.burst}, max in flight {config.max_in_flight}"
        f" (0 = unlimited); {preemption_text(config)}"
    )


def preemption_text(config: QueueConfig) -> str:
    """A queue's preemption policy in words."""
    if config.preempt_min_priority is None:
        preempts = "its jobs do not preempt"
    else:
        preempts = f"its jobs of priority {config.preempt_min_priority}+ may preempt"
    if config.preemptible_fraction < 1:
        return f"{preempts}; at most {config.preemptible_fraction:.0%} of it preempted at once"
    return preempts


def tenant_set(name: str, config: TenantConfig) -> None:
    """What ``tenant set`` says on stderr once the value is stored.

    Args:
        name: the tenant.
        config: what it was set to.
    """
    err(f"tenant {name}: weight {config.weight:g}")


def zones_set(config: ZoneMap) -> None:
    """What ``zones set`` says on stderr once the map is stored.

    Args:
        config: the zone map.
    """
    err(f"zone map set: {len(config.distances)} zones, default distance {config.default}")


def _invalid(settings: ClusterSettings, kind: str) -> None:
    for key, why in settings.invalid.items():
        if key == kind or key.startswith(kind + "."):
            err(f"{key} holds an invalid value that the schedulers ignore: {why}")


def queue_configs(settings: ClusterSettings, as_json: bool) -> None:
    """What ``queue list`` prints: every configured queue's rate, burst and in-flight cap.

    Args:
        settings: the cluster configuration.
        as_json: print a JSON list of ``{"queue", "rate", "burst", "max_in_flight"}``.
    """
    items = sorted(settings.queues.items())
    if as_json:
        json_out([{"queue": name, **msgspec.structs.asdict(c)} for name, c in items])
    else:
        table(
            ["QUEUE", "RATE", "BURST", "MAX IN FLIGHT", "PREEMPTS FROM", "PREEMPTIBLE"],
            [
                [
                    name,
                    f"{c.rate:g}/s" if c.rate else "-",
                    str(c.burst or "-"),
                    str(c.max_in_flight or "-"),
                    "-" if c.preempt_min_priority is None else f"priority {c.preempt_min_priority}",
                    f"{c.preemptible_fraction:.0%}",
                ]
                for name, c in items
            ],
            right=frozenset({1, 2, 3}),
        )
        if not items:
            err("no queue is configured: every queue is unlimited")
    _invalid(settings, "queue")


def tenant_configs(settings: ClusterSettings, as_json: bool) -> None:
    """What ``tenant list`` prints: every configured tenant's fair-share weight.

    Args:
        settings: the cluster configuration.
        as_json: print a JSON list of ``{"tenant", "weight"}``.
    """
    items = sorted(settings.tenants.items())
    if as_json:
        json_out([{"tenant": name, "weight": c.weight} for name, c in items])
    else:
        table(["TENANT", "WEIGHT"], [[name, f"{c.weight:g}"] for name, c in items], right=frozenset({1}))
        if not items:
            err("no tenant is configured: every tenant has weight 1")
    _invalid(settings, "tenant")


def zone_map(settings: ClusterSettings, as_json: bool) -> None:
    """What ``zones show`` prints: the distances between zones and the default.

    Args:
        settings: the cluster configuration.
        as_json: print ``{"distances": ..., "default": ...}``, the format ``zones set`` reads.
    """
    zones = settings.zones
    if as_json:
        json_out(None if zones is None else {"distances": zones.distances, "default": zones.default})
    elif zones is None:
        err("no zone map is set: zones count as distance 0 to themselves and 100 to any other")
    else:
        print(f"default distance {zones.default}")
        table(
            ["FROM", "TO", "DISTANCE"],
            [[a, b, str(d)] for a, row in sorted(zones.distances.items()) for b, d in sorted(row.items())],
            right=frozenset({2}),
        )
    _invalid(settings, "zones")
