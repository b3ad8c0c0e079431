"""The environment of a job's process: cleared, then the allow-list, then its own, then jobmesh's.

Nothing of the executor's own environment reaches a job unless its name is in
``JOBMESH_ENV_ALLOW`` (``PATH,LANG,LC_ALL,TZ`` by default): no credentials, no NATS URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"


def allowed_environment(environ: Mapping[str, str], allow: str) -> dict[str, str]:
    """The executor's variables a job may see.

    Args:
        environ: the executor's environment.
        allow: ``JOBMESH_ENV_ALLOW``, comma-separated names.

    Returns:
        Those of the names that are set, plus PATH and LANG (defaults when unset: a job
        always has a PATH and a UTF-8 locale).
    """
    names = [name.strip() for name in allow.split(",") if name.strip()]
    env = {name: environ[name] for name in names if name in environ}
    env["PATH"] = env.get("PATH") or environ.get("PATH") or DEFAULT_PATH
    env["LANG"] = env.get("LANG") or DEFAULT_LANG
    return env


def job_environment(
    base: Mapping[str, str], workdir: Path, own: Mapping[str, str], job_vars: Mapping[str, str]
) -> dict[str, str]:
    """A job's complete environment.

    Args:
        base: the allow-listed variables (:func:`allowed_environment`).
        workdir: its working directory (HOME).
        own: the job's own variables (its runtime's ``env``, secrets as variables).
        job_vars: jobmesh's variables, last, so a job cannot claim another job's identity.

    Returns:
        The environment.
    """
    env = {**base, "HOME": str(workdir)}
    env.update(own)
    env.update(job_vars)
    return env
