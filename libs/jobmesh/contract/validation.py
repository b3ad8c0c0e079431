"""Checks on a job spec that its types alone cannot express.

Types, ranges and patterns are checked by msgspec while decoding; this module checks the
relations between fields. Each error names the field, relative to the spec.
"""

from __future__ import annotations

import re

import msgspec

from jobmesh.contract.messages.v1 import (
    FAILURE_CODES,
    MAX_STDIN_BYTES,
    MAX_UPLOAD_BYTES,
    ContainerRuntime,
    HandlerRuntime,
    InputFile,
    JobSpec,
    JobSpecBase,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    Resources,
)
from jobmesh.errors import InvalidSpec

# Beyond these, a request is a typo rather than a real job.
MAX_CPU_MILLI = 1_024_000
MAX_MEMORY_MB = 64 * 1024 * 1024
MAX_GPU = 1024
MAX_DISK_MB = 1024 * 1024 * 1024


def validate_spec(spec: JobSpecBase, where: str = "spec", may_hold_nul: bool = True, now: float | None = None) -> None:
    """Raise ``InvalidSpec`` naming the field when ``spec`` asks for something impossible.

    Args:
        spec: a decoded job spec (or a fallback spec: the same checks, less the policy).
        where: the path of the spec in the request, prefixed to field names.
        may_hold_nul: False when the caller knows no string can hold NUL (the raw JSON has
            no ``\u0000``), which spares the walk over every string.
        now: the submission time, when the spec is being submitted; enables the checks
            that relate ``not_before`` to it.
    """
    res = spec.resources
    # A no-op job (the benchmark's) pays one type test for every runtime check.
    if type(spec.runtime) is not NoopRuntime:
        _validate_runtime(spec, where)
    # The contract's max_length counts characters; the limit is of bytes (what travels and
    # is stored), and a character takes up to 4 of them in UTF-8.
    if spec.stdin and len(spec.stdin) * 4 > MAX_STDIN_BYTES:
        size = len(spec.stdin.encode("utf-8", "surrogatepass"))
        if size > MAX_STDIN_BYTES:
            _fail(
                where,
                "stdin",
                f"{size} bytes (UTF-8) exceed the inline limit of {MAX_STDIN_BYTES} bytes;"
                " upload a larger stdin (stdin_object)",
            )
    if res.cpu_milli > MAX_CPU_MILLI:
        _fail(where, "resources.cpu_milli", f"{res.cpu_milli} exceeds the maximum {MAX_CPU_MILLI}")
    if res.memory_mb > MAX_MEMORY_MB:
        _fail(where, "resources.memory_mb", f"{res.memory_mb} exceeds the maximum {MAX_MEMORY_MB}")
    if res.gpu > MAX_GPU:
        _fail(where, "resources.gpu", f"{res.gpu} exceeds the maximum {MAX_GPU}")
    if res.disk_mb > MAX_DISK_MB:
        _fail(where, "resources.disk_mb", f"{res.disk_mb} exceeds the maximum {MAX_DISK_MB}")
    if res.gpu_kind and res.gpu == 0:
        _fail(where, "resources.gpu", f"gpu_kind {res.gpu_kind!r} is set but gpu is 0")
    if spec.concurrency_limit and not spec.concurrency_key:
        _fail(where, "concurrency_key", "concurrency_limit is set but concurrency_key is empty")
    if spec.concurrency_key and not spec.concurrency_limit:
        _fail(where, "concurrency_limit", "concurrency_key is set but concurrency_limit is 0")
    if now is not None and spec.not_before and spec.timeouts.queue and spec.not_before >= now + spec.timeouts.queue:
        # It would wait for its start time past its queue deadline: it could only expire.
        _fail(
            where,
            "timeouts.queue",
            f"the job may not start for {spec.not_before - now:.0f}s (not_before) but expires after "
            f"{spec.timeouts.queue:g}s in the queue; it could never run",
        )
    for key, value in spec.constraints.labels.items():
        problem = label_problem(key, value)
        if problem:
            _fail(where, "constraints.labels", problem)
    # Most jobs name no files, secrets or stdin object: one test is all they cost here.
    if spec.files or spec.secrets or spec.stdin_object:
        _validate_inputs(spec, where)
    if isinstance(spec, JobSpec):
        _validate_retry(spec, where, now)
        if spec.replicas > 1 or spec.same:
            _validate_gang(spec, where)
    nul = _first_nul(msgspec.to_builtins(spec), where) if may_hold_nul else ""
    if nul:
        # JSON allows "\u0000"; Postgres text does not, so the job's history could not be
        # recorded. Refuse it here rather than half-create it.
        raise InvalidSpec(f"a NUL character is not allowed - at `$.{nul}`", field=nul)


GANG_SAME_ZONE = "zone"
GANG_SAME_LABEL = "label:"  # the prefix of a label attribute: label:<key>


def same_problem(same: str) -> str:
    """Why ``same`` names no node attribute a gang can share ("" when it does)."""
    if same == GANG_SAME_ZONE:
        return ""
    if same.startswith(GANG_SAME_LABEL):
        key = same[len(GANG_SAME_LABEL) :]
        return label_problem(key, "x") if key else "label: needs a key (label:<key>)"
    return f"{same!r} is no node attribute: a gang can share only 'zone' or 'label:<key>'"


def gang_group(node: NodeInfo, same: str) -> str | None:
    """The value of a gang's ``same`` attribute on ``node`` ("" when the gang names none);
    None when the node lacks it: sharing "no zone" is not sharing a zone."""
    if not same:
        return ""
    if same == GANG_SAME_ZONE:
        return node.zone or None
    return node.labels.get(same[len(GANG_SAME_LABEL) :])


def gang_need(replicas: int, res: Resources, same: str) -> str:
    """What a gang needs, as a person recognises it: "needs 4 nodes with gpu kind h100 in
    one zone" (the scheduler's and the binder's wait reasons start with it)."""
    if res.gpu_kind:
        what = f"with gpu kind {res.gpu_kind}" if res.gpu == 1 else f"with {res.gpu} gpus of kind {res.gpu_kind}"
    elif res.gpu:
        what = f"with {res.gpu} gpu"
    else:
        what = f"with {res.cpu_milli}m cpu and {res.memory_mb} MiB"
    if not same:
        scope = ""
    elif same == GANG_SAME_ZONE:
        scope = " in one zone"
    else:
        scope = f" sharing one value of label {same[len(GANG_SAME_LABEL) :]}"
    return f"needs {replicas} nodes {what}{scope}"


def _validate_gang(spec: JobSpec, where: str) -> None:
    if spec.same and spec.replicas == 1:
        _fail(where, "same", "same constrains a gang's members; set replicas to 2 or more")
    problem = same_problem(spec.same) if spec.same else ""
    if problem:
        _fail(where, "same", problem)
    if spec.map is not None:
        _fail(where, "replicas", "a mapped step cannot be a gang: each item is a job of its own")


def env_name_problem(key: str) -> str:
    """Why ``key`` cannot be the name of a job's variable ("" when it can).

    The one rule for a variable's name, applied by the client to ``--env``/``--env-file``
    and at submit to ``runtime.env``: a portable shell name. Beyond portability it is a
    safety rule: a name with ``=`` or a line break would become other variables (or a bare
    name, which an engine fills from its own environment) in a container's env file.

    Args:
        key: the variable's name.

    Returns:
        The problem in words, or "".
    """
    if not _ENV_NAME.fullmatch(key):
        return f"{key!r} is not a variable name: use letters, digits and '_', not a digit first"
    return ""


def _validate_env(env: dict[str, str], where: str, container: bool) -> None:
    for key, value in env.items():
        problem = env_name_problem(key)
        if problem:
            _fail(where, f"runtime.env[{key!r}]", problem)
        if "\x00" in value:
            # No process environment can hold it (and Postgres text cannot store it).
            _fail(where, f"runtime.env[{key!r}]", "a NUL character is not allowed in a variable's value")
        if container and ("\n" in value or "\r" in value):
            # An engine's env file cannot carry it, and its command line is anyone's to read.
            _fail(
                where,
                f"runtime.env[{key!r}]",
                "a container's variable cannot hold a line break; give the value as a file (files)",
            )


def _validate_retry(spec: JobSpec, where: str, now: float | None) -> None:
    policy = spec.retry
    for i, code in enumerate(policy.retry_on):
        if code not in FAILURE_CODES:
            known = ", ".join(sorted(FAILURE_CODES))
            _fail(where, f"retry.retry_on[{i}]", f"unknown failure code {code!r}; the codes are: {known}")
        if code in ("cancelled", "superseded"):
            _fail(where, f"retry.retry_on[{i}]", f"{code!r} is never retried: nobody wants that attempt again")
    if policy.backoff_max < policy.backoff:
        _fail(where, "retry.backoff_max", f"{policy.backoff_max:g}s is shorter than backoff {policy.backoff:g}s")
    if policy.migrate_after and policy.migrate_after >= policy.max_attempts:
        _fail(
            where,
            "retry.migrate_after",
            f"{policy.migrate_after} failures on one node can never happen within max_attempts {policy.max_attempts}",
        )
    if policy.migrate_zone and not policy.migrate_after:
        _fail(where, "retry.migrate_zone", "migrate_zone is set but migrate_after is 0")
    timeouts = spec.timeouts
    if timeouts.total and timeouts.total < timeouts.queue:
        _fail(where, "timeouts.total", f"{timeouts.total:g}s is shorter than the queue timeout {timeouts.queue:g}s")
    if policy.fallback is not None:
        # A fallback is a job of its own: the same checks, named under its own path.
        validate_spec(policy.fallback, f"{where}.retry.fallback", may_hold_nul=False, now=now)


def input_path_problem(path: str) -> str:
    """Why ``path`` cannot be where an input file goes in a working directory ("" when it can).

    The one rule for a file's place: the client checks a destination with it before it
    uploads anything, the trigger at submit, and the executor confines the file to the
    working directory besides (a symlink there could still point outside).

    Args:
        path: the file's path, as ``InputFile.path`` holds it.

    Returns:
        The problem in words, or "".
    """
    if not path or path.strip() in ("", "."):
        return "the path is empty; name the file's place in the working directory"
    if path.startswith("/"):
        return f"{path!r} is absolute; give a path relative to the working directory"
    if "\x00" in path:
        return "a NUL character is not allowed in a path"
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return f"{path!r} names the working directory itself, not a file in it"
    if ".." in parts:
        return f"{path!r} has a '..' component; a file stays inside the working directory"
    return ""


def _validate_inputs(spec: JobSpecBase, where: str) -> None:
    if spec.files:
        _validate_files(spec.files, where)
    if spec.secrets:
        _validate_secrets(spec.secrets, where)
    if spec.stdin and spec.stdin_object:
        _fail(where, "stdin_object", "stdin and stdin_object are both set; give the job one stdin")


def _validate_runtime(spec: JobSpecBase, where: str) -> None:
    runtime = spec.runtime
    if isinstance(runtime, ProcessRuntime):
        if not runtime.argv[0].strip():
            _fail(where, "runtime.argv[0]", "the command is empty")
        if runtime.env:
            _validate_env(runtime.env, where, container=False)
    elif isinstance(runtime, ContainerRuntime):
        if runtime.env:
            _validate_env(runtime.env, where, container=True)
    elif isinstance(runtime, HandlerRuntime):
        _validate_handler_inputs(spec, where)


def _validate_handler_inputs(spec: JobSpecBase, where: str) -> None:
    """A handler runs in a worker started before the job came: it has its ``input``, and
    none of what a process starts from (its working directory, stdin and secrets are not
    in the worker's reach), so asking for them would be silently ignored."""
    asked = (
        ("files", spec.files, "input files are"),
        ("secrets", spec.secrets, "secrets are"),
        ("stdin", spec.stdin, "a stdin is"),
        ("stdin_object", spec.stdin_object, "a stdin is"),
    )
    for name, given, what in asked:
        if given:
            _fail(where, name, f"a handler job gets only its runtime.input; {what} for process and container jobs")


def _validate_files(files: list[InputFile], where: str) -> None:
    seen: dict[str, int] = {}
    total = 0
    for i, item in enumerate(files):
        problem = input_path_problem(item.path)
        if problem:
            _fail(where, f"files[{i}].path", problem)
        if bool(item.object) == bool(item.node_path):
            _fail(
                where,
                f"files[{i}]",
                f"{item.path!r} needs exactly one source: object (an upload) or node_path (a path on the node)",
            )
        if item.node_path and not item.node_path.startswith("/"):
            _fail(where, f"files[{i}].node_path", f"{item.node_path!r} is not an absolute path on the node")
        key = _normal_path(item.path)
        if key in seen:
            _fail(where, f"files[{i}].path", f"{item.path!r} is given twice (files[{seen[key]}] too)")
        seen[key] = i
        total += item.size
        if total > MAX_UPLOAD_BYTES:
            _fail(
                where,
                f"files[{i}].size",
                f"the files add up to {total} bytes with {item.path!r}, over the limit of {MAX_UPLOAD_BYTES} bytes",
            )


def _validate_secrets(secrets: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(secrets):
        if name in seen:
            _fail(where, f"secrets[{i}]", f"secret {name!r} is named twice (secrets[{seen[name]}] too)")
        seen[name] = i


def _normal_path(path: str) -> str:
    # "a/./b" and "a//b" are the same file as "a/b".
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def label_problem(key: str, value: str) -> str:
    """Why a node label ``key=value`` is not allowed ("" when it is).

    The one rule for labels, applied where a job asks for one (by the message types at
    decode) and where an executor advertises one (``JOBMESH_NODE_LABELS``), so that a job
    can never require a label that no executor could carry.
    """
    if not _LABEL_KEY.fullmatch(key):
        return f"bad label key {key!r}: use 1-128 of A-Z a-z 0-9 _ . - /"
    if len(value) > 256 or not _LABEL_VALUE.fullmatch(value):
        return f"bad label value {value!r} for {key!r}: no comma, no leading or trailing space, at most 256 characters"
    return ""


# What a variable's name may be (POSIX's portable names; see env_name_problem).
# fullmatch, not match with "$": "$" also matches before a final line break.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Node labels: one rule for what a job asks for and what an executor advertises
# (``JOBMESH_NODE_LABELS`` is ``k=v,k2=v2``, so a value holds no comma and no edge spaces).
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_LABEL_VALUE = re.compile(r"^(?:[^,\s](?:[^,]*[^,\s])?)?$")


def _first_nul(value: object, path: str) -> str:
    if isinstance(value, str):
        return path if "\x00" in value else ""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_nul(key, f"{path}.{key}") or _first_nul(item, f"{path}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_nul(item, f"{path}[{i}]")
            if found:
                return found
    return ""


def _fail(where: str, field: str, message: str) -> None:
    path = f"{where}.{field}"
    raise InvalidSpec(f"{message} - at `$.{path}`", field=path)
