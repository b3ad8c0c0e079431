"""The deployment files as data: helpers (no tests) for tests/test_deploy.py and test_deploy_health.py.

compose.yaml is read with PyYAML, the Nomad job specs with python-hcl2; these helpers walk
both into the few shapes the checks compare: each process's command, environment, ports
and health check.
"""

from __future__ import annotations

import functools
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import hcl2
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
NOMAD_DIR = ROOT / "deploy" / "nomad"
JOBMESH_IMAGE = "jobmesh:local"

_HCL = hcl2.SerializationOptions(strip_string_quotes=True, preserve_heredocs=True, explicit_blocks=False)
_LISTEN = re.compile(r"^(?:0\.0\.0\.0|\[::\]|)?:(\d+)$")
_URL_PORT = re.compile(r"https?://127\.0\.0\.1:(\d+)/healthz")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


@functools.cache
def compose() -> dict[str, Any]:
    """compose.yaml as PyYAML reads it (once: callers do not change it)."""
    return yaml.safe_load(COMPOSE.read_text())


def jobmesh_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run the jobmesh image (the provisioner included)."""
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == JOBMESH_IMAGE}


@functools.cache
def nomad_jobs() -> dict[str, dict[str, Any]]:
    """Each deploy/nomad/*.nomad.hcl by file stem, as python-hcl2 reads it (once)."""
    return {
        path.name.removesuffix(".nomad.hcl"): hcl2.load(path.open(), serialization_options=_HCL)
        for path in sorted(NOMAD_DIR.glob("*.nomad.hcl"))
    }


def only(blocks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The one labelled block of a list python-hcl2 gives (``job``, ``group``, ``task``)."""
    assert len(blocks) == 1, blocks
    ((label, body),) = blocks[0].items()
    return label, body


def nomad_parts(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A job spec's job, its one group and that group's one task."""
    _, job = only(doc["job"])
    _, group = only(job["group"])
    _, task = only(group["task"])
    return job, group, task


def heredoc(text: str) -> str:
    """The content of a ``<<-EOT`` heredoc as Nomad sees it (indentation removed)."""
    head, _, body = text.partition("\n")
    assert head.startswith("<<-"), head
    marker = head[3:]
    body = body.rstrip()
    assert body.endswith(marker), body[-40:]
    return textwrap.dedent(body[: -len(marker)])


def template_env(task: dict[str, Any]) -> dict[str, str]:
    """The variables a task's ``env = true`` templates set (``NAME=value`` lines)."""
    env: dict[str, str] = {}
    for template in task.get("template", []):
        if not template.get("env"):
            continue
        for line in heredoc(template["data"]).splitlines():
            # NAME=value, at the start of the line or after a {{ with ... }}; the value is
            # kept as written, template actions and all.
            found = re.search(r"(?:^|\}\})\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
            if found:
                env[found.group(1)] = found.group(2)
    return env


def nomad_env(task: dict[str, Any]) -> dict[str, str]:
    """Every variable a task gets: its env block and its env templates."""
    env: dict[str, str] = {}
    for block in task.get("env", []):
        env.update(block)
    env.update(template_env(task))
    return env


def listen_port(value: str) -> int | None:
    """The port of a ``0.0.0.0:port`` listen address, else None."""
    found = _LISTEN.match(value)
    return int(found.group(1)) if found else None


def healthcheck_port(service: dict[str, Any]) -> int:
    """The loopback port a compose health check's URL names."""
    test = " ".join(service["healthcheck"]["test"])
    found = _URL_PORT.search(test)
    assert found, f"the health check does not reach a loopback /healthz: {test}"
    return int(found.group(1))


def duration_seconds(text: str) -> float:
    """``30s``, ``1m30s``, ``2m`` as seconds (compose and Nomad durations)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` against ``env``."""

    def one(found: re.Match[str]) -> str:
        name, default = found.group(1), found.group(2) or ""
        return env.get(name) or ("" if found.group(0).count("?") else default)

    return _INTERPOLATION.sub(one, value)


def console_scripts() -> set[str]:
    """pyproject.toml's [project.scripts]."""
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def code_text() -> str:
    """Every Python source of the package (libs/ and services/), for names read outside
    ``Settings``."""
    return "\n".join(path.read_text() for base in ("libs", "services") for path in (ROOT / base).rglob("*.py"))
