"""The exit codes of the ``jobmesh`` command, one meaning each, for scripts to branch on."""

from __future__ import annotations

from jobmesh.contract.messages.v1 import JobView

EXIT_OK = 0  # done
EXIT_USAGE = 1  # a bad command line, or a request the cluster refused
EXIT_UNAVAILABLE = 2  # the cluster is unreachable or busy: the same command may work later
EXIT_FAILED = 3  # the job ended and did not succeed (``run``, ``watch``)
EXIT_NOT_FOUND = 4  # the job (or other thing) asked for does not exist
EXIT_CANCELLED = 5  # the workflow run was cancelled (``workflow run``, ``status --follow``)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def for_final_view(view: JobView) -> int:
    """The exit code of ``run`` and ``watch`` once a job has ended for good.

    Args:
        view: the tracker's view of the job, ``final``.

    Returns:
        0 when it succeeded; 3 when it failed, was lost, expired or was cancelled.

    Raises:
        ValueError: when the view is not final (the job may still be retried).
    """
    if not view.final:
        raise ValueError(f"job {view.job_id} has not ended: it is {view.state} and may be retried")
    return EXIT_OK if view.state == "succeeded" else EXIT_FAILED
