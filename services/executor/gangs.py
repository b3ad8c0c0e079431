"""What a member of a gang (``JobSpec.replicas`` > 1) learns of its gang, and keeps of it.

The binder puts every member of a gang on a node of its own and tells each, in its
``JobBound``, its ``rank`` (0..N-1), the gang's ``world_size`` (N) and every member's
``peers`` address ("host:port" by rank). The job reads them from its environment
(:func:`gang_env`). A member's success is not the job's (``MemberSucceeded``, see
:func:`~jobmesh.executor.outcomes.end_kind`): the scheduler ends the job once every member
succeeded, with rank 0's result, so rank 0 alone keeps a workflow step's result
(:func:`keeps_result`). The members share job and attempt, so each message a member
publishes has an id of its own (``ids.member_event_id``; ``ids.log_id`` with its rank for
its output lines).
"""

from __future__ import annotations

from jobmesh.contract.messages.v1 import JobBound

RANK_VAR = "JOBMESH_RANK"
WORLD_SIZE_VAR = "JOBMESH_WORLD_SIZE"
PEERS_VAR = "JOBMESH_PEERS"
PEER_PORT_VAR = "JOBMESH_PEER_PORT"
LEADER_VAR = "JOBMESH_LEADER"


def gang_env(bound: JobBound) -> dict[str, str]:
    """The gang variables of a job's environment.

    Every job gets ``JOBMESH_RANK``, ``JOBMESH_WORLD_SIZE`` and ``JOBMESH_PEERS`` (0, 1
    and "" for a plain job), so one program runs alone or in a gang unchanged. A member
    also gets ``JOBMESH_PEER_PORT``, the port its own peers entry names (where the others
    reach it), and ``JOBMESH_LEADER``, rank 0's "host:port".

    Args:
        bound: the member's dispatch message.

    Returns:
        The variables, to be set after the job's own (a job cannot claim another rank).
    """
    env = {RANK_VAR: str(bound.rank), WORLD_SIZE_VAR: str(bound.world_size), PEERS_VAR: ",".join(bound.peers)}
    if bound.world_size > 1 and bound.rank < len(bound.peers):
        # rpartition: an IPv6 host ("[::1]:29500") holds colons of its own.
        env[PEER_PORT_VAR] = bound.peers[bound.rank].rpartition(":")[2]
        env[LEADER_VAR] = bound.peers[0]
    return env


def keeps_result(bound: JobBound) -> bool:
    """Whether the attempt stores its result as the job's kept result (``step/<job_id>``).

    One key per job: were every member of a gang to keep its own, the last to finish would
    win, while the job's end carries rank 0's result.

    Args:
        bound: the dispatch message.

    Returns:
        ``JobSpec.keep_result``, for a plain job and a gang's rank 0; False for other ranks.
    """
    return bound.spec.keep_result and bound.rank == 0
