"""The deployment files, checked without Docker or Nomad.

compose.yaml and deploy/nomad/*.nomad.hcl are generated from deploy/services.yaml (a test
fails when they are stale), parsed, and every command, variable and port they use is
checked against the code: commands against pyproject.toml's console scripts and the
``jobmesh`` command line, ``JOBMESH_*`` variables against ``Settings`` (and their values
through it), ports between the ops endpoint, the health checks and Prometheus' scrape.
The NATS configurations are tested by the pinned nats-server itself (``-t``).
tests/test_deploy_health.py runs each compose command and waits for it to be healthy.

NATS runs with authentication in both: every process must name its own identity's seed
(``JOBMESH_NATS_NKEY_FILE``), which the tests check against the code (who the process
connects as, what ``jobmesh auth issue`` writes, the key ``auth.conf`` grants that identity)
and against the files that deliver it (compose's credentials volume, a Nomad variable only
that task may read).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path

import opentelemetry.environment_variables as otel_api_env
import opentelemetry.sdk.environment_variables as otel_sdk_env
import pytest
import yaml

from jobmesh.client import client as client_module
from jobmesh.client.cli.parser import build_parser
from jobmesh.contract import permissions, streams
from jobmesh.dev import deploygen
from jobmesh.dev.servers import nats_server_binary
from jobmesh.executor.service import FINAL_FLUSH_SECONDS
from jobmesh.runtime import commands, natsauth
from jobmesh.runtime.settings import Settings
from tests.test_deploy_files import (
    ROOT,
    code_text,
    compose,
    console_scripts,
    duration_seconds,
    healthcheck_port,
    heredoc,
    interpolate,
    jobmesh_services,
    listen_port,
    nomad_env,
    nomad_jobs,
    nomad_parts,
    only,
)
from tests.test_nats_configs import options as nats_options

SERVICES = ("trigger", "scheduler", "binder", "executor", "tracker")
SETTINGS_NAMES = {f"JOBMESH_{field.upper()}": field for field in Settings.__struct_fields__}
# The executor's SIGTERM path: attempts get the drain, then their kill grace, then what is
# queued is published (up to FINAL_FLUSH_SECONDS) and the NATS connection drains (up to 5 s).
CONNECTION_DRAIN_SECONDS = FINAL_FLUSH_SECONDS + 5.0


def source() -> deploygen.Source:
    return deploygen.load_source(ROOT / deploygen.SOURCE)


# --- credentials: what the files say, and what the code makes of it ---------------------

SEED_VARIABLE = "JOBMESH_NATS_NKEY_FILE"
# Other ways a process could be handed a key: none of the files may use them.
OTHER_KEY_VARIABLES = ("JOBMESH_NATS_NKEY", "JOBMESH_ADMIN_NKEY_FILE", "JOBMESH_NATS_IDENTITY")
BIN = Path(sys.executable).parent


def credentials_service() -> dict:
    return compose()["services"][deploygen.CREDENTIALS_SERVICE]


def _option(command: list[str], flag: str) -> list[str]:
    """Every value of ``flag`` in a command line."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def compose_credentials_dir() -> str:
    """Where the credentials service writes the seeds: its ``--dir``."""
    (directory,) = _option(credentials_service()["command"], "--dir")
    return directory


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """A compose service's mounts: container path -> (source, read-only)."""
    found = {}
    for volume in service.get("volumes", []):
        host, target, *mode = volume.split(":")
        found[target] = (host, mode == ["ro"])
    return found


def _service_of(command: list[str]) -> str:
    """The settings name a command runs under: ``jobmesh-trigger`` is the trigger's,
    ``jobmesh provision`` and ``jobmesh auth issue`` read the provisioner's (``provision``),
    ``jobmesh web`` is a client."""
    if command[0] != "jobmesh":
        return command[0].removeprefix("jobmesh-")
    return "web" if command[1] == "web" else "provision"


def connects_as(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The identity a process connects as, asked of the code: the inbox prefix it uses, which
    the server lets only that identity read (``Settings`` for the services and the
    provisioner, the client library for ``jobmesh web``)."""
    service = _service_of(command)
    if service == "web":
        for name in (*client_module.CREDENTIAL_VARIABLES, client_module.ADMIN_KEY_VARIABLE):
            monkeypatch.delenv(name, raising=False)
        if env.get("JOBMESH_NATS_IDENTITY"):
            monkeypatch.setenv("JOBMESH_NATS_IDENTITY", env["JOBMESH_NATS_IDENTITY"])
        monkeypatch.setenv("JOBMESH_NATS_URL", "nats://127.0.0.1:4222")
        prefix = client_module.connect_options("nats://127.0.0.1:4222")["inbox_prefix"]
        identity = prefix.removeprefix(permissions.inbox_of(""))
    else:
        settings = Settings(
            service=service,
            node_id=env.get("JOBMESH_NODE_ID", ""),
            nats_identity=env.get("JOBMESH_NATS_IDENTITY", ""),
        )
        identity = settings.identity
        prefix = natsauth.connect_options(settings)["inbox_prefix"]
    assert permissions.inbox_of(identity) == prefix, prefix
    return identity


def granted_keys(auth_conf: str) -> dict[str, str]:
    """Each identity's public key in an ``auth.conf`` (the comment before each ``nkey``)."""
    return dict(re.findall(r'#\s*(\S+)\n\s*nkey:\s*"(U[A-Z0-9]+)"', auth_conf))


def run_compose_issue(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The credentials service's command, run here with its environment: ``--dir`` is
    ``directory`` instead of the volume, every other argument as compose has it."""
    service = credentials_service()
    command = list(service["command"])
    command[command.index("--dir") + 1] = str(directory)
    env = {k: interpolate(str(v), {}) for k, v in service["environment"].items()}
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return subprocess.run(
        [str(BIN / command[0]), *command[1:], *extra],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What compose's credentials service writes into its volume, written here."""
    directory = tmp_path_factory.mktemp("compose-credentials") / "credentials"
    result = run_compose_issue(directory)
    assert result.returncode == 0, result.stderr
    return directory


def issued_path(value: str, issued: Path) -> Path:
    """A path inside compose's credentials volume, as the file ``issued`` holds."""
    directory = compose_credentials_dir()
    assert posixpath.dirname(value) == directory, f"{value} is not in the credentials volume {directory}"
    return issued / posixpath.basename(value)


def dockerfile_uid() -> int:
    """The uid the jobmesh image runs as (``useradd --uid``)."""
    (uid,) = re.findall(r"useradd\b[^\n]*--uid (\d+)", (ROOT / "deploy/Dockerfile").read_text())
    return int(uid)


def nomad_provision_args(args: object, nodes: list[str]) -> list[str]:
    """The Nomad provisioner's args for these executor nodes: the list before them, then
    ``--node <id>`` for each node of ``var.executor_nodes`` (the HCL expression, evaluated)."""
    assert isinstance(args, str), args
    found = re.fullmatch(
        r'\$\{concat\((\[[^\]]*\]), flatten\(\[for node in var\.executor_nodes : \["--node", node\]\]\)\)\}',
        args,
    )
    assert found, f"not the per-node expression: {args}"
    return [*json.loads(found.group(1)), *[arg for node in nodes for arg in ("--node", node)]]


# --- generated, and from one source ------------------------------------------------------


def test_generated_files_are_current() -> None:
    stale = deploygen.stale(ROOT)
    assert not stale, f"stale deployment files {[str(p) for p in stale]}: run `python -m jobmesh.dev.deploygen`"


def test_every_generated_file_says_so_in_its_first_line() -> None:
    for path in deploygen.generate(ROOT):
        assert "Generated by `python -m jobmesh.dev.deploygen`" in (ROOT / path).read_text().splitlines()[0], path


def test_the_check_mode_names_a_stale_file(tmp_path: Path) -> None:
    for rel in (deploygen.SOURCE, deploygen.COMPOSE_BASE, deploygen.NATS_CLUSTER_CONF):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    assert deploygen.main(["--root", str(tmp_path)]) == 0
    assert deploygen.main(["--root", str(tmp_path), "--check"]) == 0
    hcl = tmp_path / "deploy/nomad/binder.nomad.hcl"
    hcl.write_text(hcl.read_text().replace("count = 2", "count = 5"))
    assert deploygen.stale(tmp_path) == [Path("deploy/nomad/binder.nomad.hcl")]
    assert deploygen.main(["--root", str(tmp_path), "--check"]) == 1


def test_a_misspelt_source_key_is_refused_naming_it(tmp_path: Path) -> None:
    text = (ROOT / deploygen.SOURCE).read_text().replace("    replicas: 2\n", "    replica: 2\n", 1)
    (tmp_path / "services.yaml").write_text(text)
    with pytest.raises(Exception, match="replica"):
        deploygen.load_source(tmp_path / "services.yaml")


def test_a_source_that_would_share_or_invent_an_identity_is_refused(tmp_path: Path) -> None:
    """Two executors on one node id would share one key and one dispatch consumer; an
    identity the permissions do not know would have no entry in auth.conf."""
    text = (ROOT / deploygen.SOURCE).read_text()
    cases = {
        "replicas must be 1": text.replace(
            "    identity: executor\n    replicas: 1\n", "    identity: executor\n    replicas: 2\n"
        ),
        "identity 'admin'": text.replace("    identity: client\n", "    identity: admin\n"),
        "not a node id": text.replace("    node: compose-1\n", "    node: compose.1\n"),
    }
    for message, changed in cases.items():
        assert changed != text, message
        (tmp_path / "services.yaml").write_text(changed)
        with pytest.raises(Exception, match=message):
            deploygen.load_source(tmp_path / "services.yaml")


# --- compose ---------------------------------------------------------------------------


def test_compose_has_every_part() -> None:
    doc = compose()
    services = doc["services"]
    for name in ("nats", "postgres", "tempo", "grafana", "prometheus", "provision", *SERVICES, "web"):
        assert name in services, name
    for name in ("nats", "postgres", "prometheus"):
        assert services[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["nats"]["healthcheck"]["test"])
    assert "./deploy/nats/nats.conf:/etc/nats/nats.conf:ro" in services["nats"]["volumes"]
    assert "8222:8222" in services["nats"]["ports"], "the monitoring port"


def test_compose_bind_mounts_are_files_of_the_repository() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name}: {host} is not in the repository"


def test_grafana_provisions_tempo_prometheus_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = {}
    for path in (ROOT / "deploy/grafana/provisioning/datasources").glob("*.yaml"):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            datasources[ds["uid"]] = ds
    assert datasources["tempo"]["type"] == "tempo"
    assert datasources["tempo"]["url"] == "http://tempo:3200"
    assert datasources["prometheus"]["type"] == "prometheus"
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/jobmesh.yaml").read_text())[
        "providers"
    ]
    dashboards_in_container = provider["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == dashboards_in_container
    assert (ROOT / "deploy/grafana/dashboards/jobmesh.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/jobmesh.json"


def test_the_provisioner_runs_once_before_every_service() -> None:
    doc = compose()
    provision = doc["services"]["provision"]
    # Streams and buckets, then each service's durables and tables (tests/test_provision_services.py),
    # and the dispatch consumer of compose's executor node, which that executor may not create.
    node = doc["services"]["executor"]["environment"]["JOBMESH_NODE_ID"]
    assert provision["command"] == ["jobmesh", "provision", "--services", "--node", node]
    assert provision["restart"] == "no"
    assert provision["depends_on"]["nats"]["condition"] == "service_healthy"
    assert provision["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "JOBMESH_DATABASE_URL" in provision["environment"]
    for name in (*SERVICES, "web"):
        depends = doc["services"][name]["depends_on"]
        assert depends["provision"]["condition"] == "service_completed_successfully", name
        assert depends["nats"]["condition"] == "service_healthy", name


def test_services_that_keep_state_in_postgres_wait_for_it() -> None:
    doc = compose()
    for name in ("scheduler", "tracker"):
        assert doc["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert doc["services"][name]["environment"]["JOBMESH_DATABASE_URL"].startswith("postgresql://")


def test_every_service_has_replicas_a_health_check_and_time_to_drain() -> None:
    doc = compose()
    for name in (*SERVICES, "web"):
        service = doc["services"][name]
        # One executor: each node has an identity of its own (credentials.compose.node).
        assert service["deploy"]["replicas"] >= (1 if name in ("web", "executor") else 2), name
        assert service["healthcheck"]["test"][0] == "CMD"
        assert service["stop_signal"] == "SIGTERM"
        grace = duration_seconds(service["stop_grace_period"])
        assert grace > _drain_budget(service["environment"]), f"{name}: stop_grace_period {grace}s"


def _fixed(env: dict[str, str], issued: Path | None = None) -> dict[str, str]:
    """The settings of ``env`` that hold no placeholder the platform fills in (``${...}``,
    ``{{ ... }}``); the seed file, a path in compose's credentials volume, becomes the file
    ``issued`` holds (or is left out without it)."""
    fixed = {k: v for k, v in env.items() if k in SETTINGS_NAMES and "${" not in v and "{{" not in v}
    if SEED_VARIABLE in fixed:
        if issued is None:
            del fixed[SEED_VARIABLE]
        else:
            fixed[SEED_VARIABLE] = str(issued_path(fixed[SEED_VARIABLE], issued))
    return fixed


def _drain_budget(env: dict[str, str]) -> float:
    """How long a stopping executor may take: its drain, its attempts' kill grace, its last
    publishes and the NATS connection's drain."""
    settings = Settings.from_env("executor", _fixed(env))
    return settings.drain_seconds + settings.kill_grace_seconds + CONNECTION_DRAIN_SECONDS


def test_health_checks_reach_the_replica_beside_them() -> None:
    """Each check is an HTTP GET of the container's own loopback /healthz (the ops endpoint
    of the process beside it), never a request a queue group's other replica may answer."""
    doc = compose()
    for name in SERVICES:
        service = doc["services"][name]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        assert "jobmesh health" not in " ".join(test)
        ops = listen_port(service["environment"]["JOBMESH_OPS_LISTEN"])
        assert ops is not None and healthcheck_port(service) == ops, name
    web = doc["services"]["web"]
    listen = web["command"][web["command"].index("--listen") + 1]
    assert healthcheck_port(web) == listen_port(listen)


def test_prometheus_scrapes_every_replica_on_its_ops_port() -> None:
    doc = compose()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in SERVICES:
        (sd,) = jobs[f"jobmesh-{name}"]["dns_sd_configs"]
        # An A lookup of the compose service name gives one address per replica.
        assert sd["type"] == "A" and sd["names"] == [name]
        ops = listen_port(doc["services"][name]["environment"]["JOBMESH_OPS_LISTEN"])
        assert sd["port"] == ops, name
        assert jobs[f"jobmesh-{name}"]["metrics_path"] == "/metrics"
    prometheus = doc["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_published_ports_match_what_the_processes_listen_on() -> None:
    doc = compose()
    trigger = doc["services"]["trigger"]
    http = listen_port(trigger["environment"]["JOBMESH_HTTP_LISTEN"])
    (mapping,) = trigger["ports"]
    hosts, container = mapping.rsplit(":", 1)
    assert int(container) == http
    first, _, last = hosts.partition("-")
    assert int(last or first) - int(first) + 1 == trigger["deploy"]["replicas"], "one host port per replica"
    web = doc["services"]["web"]
    (mapping,) = web["ports"]
    listen = web["command"][web["command"].index("--listen") + 1]
    assert int(mapping.rsplit(":", 1)[1]) == listen_port(listen)


# --- commands and variables, against the code ------------------------------------------


def _commands() -> list[tuple[str, list[str]]]:
    """Every jobmesh command of compose and Nomad; the Nomad provisioner's for compose's
    executor node (its args are an expression over ``var.executor_nodes``)."""
    found = [(f"compose {name}", list(svc["command"])) for name, svc in jobmesh_services(compose()).items()]
    nodes = [compose()["services"]["executor"]["environment"]["JOBMESH_NODE_ID"]]
    for stem, doc in nomad_jobs().items():
        if stem == "nats":
            continue
        _, _, task = nomad_parts(doc)
        (config,) = task["config"]
        args = config.get("args", [])
        if stem == "provision":
            args = nomad_provision_args(args, nodes)
        found.append((f"nomad {stem}", [config["command"], *args]))
    return found


def test_every_command_is_a_console_script_or_a_jobmesh_subcommand() -> None:
    scripts = console_scripts()
    parser = build_parser()
    for where, command in _commands():
        assert command[0] in scripts, f"{where}: {command[0]} is not in [project.scripts]"
        if command[0] != "jobmesh":
            assert command[1:] == [], f"{where}: the service entry points take no arguments"
            continue
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert command[1] in subcommands, f"{where}: `jobmesh {command[1]}` is not a subcommand"
        try:
            args = parser.parse_args(command[1:])
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{shlex.join(command)}` does not parse") from exc
        assert args.fn.__name__ != "fn", (
            f"{where}: `jobmesh {command[1]}` is unavailable (its entry point did not load)"
        )


def test_compose_and_nomad_run_the_same_commands() -> None:
    found = dict(_commands())
    for name in jobmesh_services(compose()):
        if name == deploygen.CREDENTIALS_SERVICE:
            continue  # compose issues its keys itself; on Nomad the operator does (deploy/README.md)
        assert found[f"compose {name}"] == found[f"nomad {name}"], name


def _environments() -> list[tuple[str, dict[str, str]]]:
    found = [(f"compose {name}", dict(svc.get("environment", {}))) for name, svc in jobmesh_services(compose()).items()]
    for stem, doc in nomad_jobs().items():
        if stem != "nats":
            found.append((f"nomad {stem}", nomad_env(nomad_parts(doc)[2])))
    return found


def _processes() -> list[tuple[str, list[str], dict[str, str]]]:
    """Each jobmesh process of compose and Nomad: where, its command, its environment."""
    found = dict(_commands())
    return [(where, found[where], env) for where, env in _environments()]


def test_every_variable_is_one_the_code_reads() -> None:
    code = code_text()
    otel = {name for module in (otel_api_env, otel_sdk_env) for name in dir(module) if name.startswith("OTEL_")}
    for where, env in _environments():
        for name in env:
            if name.startswith("OTEL_"):
                assert name in otel, f"{where}: {name} is not an OpenTelemetry variable"
                continue
            assert name.startswith("JOBMESH_"), f"{where}: {name} is neither JOBMESH_* nor OTEL_*"
            # A Settings field, or a name the code spells out (jobmesh web's token).
            assert name in SETTINGS_NAMES or f'"{name}"' in code, f"{where}: no code reads {name}"


def test_every_settings_value_parses(issued: Path) -> None:
    """Settings.from_env checks each value as the process would at start, under the process's
    own name (an executor with a key must name its node), with compose's seed files as the
    credentials service writes them (a placeholder the platform fills in, ``${...}``, is
    left out)."""
    for where, command, env in _processes():
        service = _service_of(command)
        settings = Settings.from_env(service, _fixed(env, issued))
        assert settings.service == service, where
        if where.startswith("compose") and SEED_VARIABLE in env:
            assert settings.authenticated, where


def test_every_jobmesh_process_has_the_same_shared_settings_in_each_file() -> None:
    for where, env in _environments():
        assert env["JOBMESH_DRAIN_SECONDS"] == "10", where
        assert env["JOBMESH_STREAM_REPLICAS"] == ("1" if where.startswith("compose") else "3"), where
        if not any(name in where for name in ("provision", "web", deploygen.CREDENTIALS_SERVICE)):
            assert listen_port(env["JOBMESH_OPS_LISTEN"]) == source().ops_port, where


# --- Nomad -----------------------------------------------------------------------------


def test_nomad_has_a_job_per_process_and_the_nats_cluster() -> None:
    assert set(nomad_jobs()) == {"nats", "provision", *SERVICES, "web"}


def test_nomad_jobs_count_restart_reschedule_and_stop_in_time() -> None:
    doc = compose()
    for stem, spec in nomad_jobs().items():
        if stem in ("nats", "provision"):
            continue
        job, group, task = nomad_parts(spec)
        if stem == "executor":
            assert job["type"] == "system"
            assert "reschedule" not in group, "Nomad does not reschedule a system job"
        else:
            assert job["type"] == "service"
            assert group["count"] == doc["services"][stem]["deploy"]["replicas"], stem
            (reschedule,) = group["reschedule"]
            assert reschedule["unlimited"] is True
        (restart,) = group["restart"]
        assert restart["attempts"] >= 1 and restart["mode"] == "delay"
        assert task["kill_signal"] == "SIGTERM"
        env = nomad_env(task)
        assert duration_seconds(task["kill_timeout"]) > _drain_budget(env), stem


def test_nomad_checks_reach_their_own_allocation() -> None:
    for stem, spec in nomad_jobs().items():
        if stem in ("nats", "provision"):
            continue
        _, group, task = nomad_parts(spec)
        (network,) = group["network"]
        ports = {label: body["to"] for port in network["port"] for label, body in port.items()}
        (config,) = task["config"]
        assert set(config["ports"]) == set(ports), stem
        env = nomad_env(task)
        services = task["service"]
        checked = {}
        for service in services:
            (check,) = service["check"]
            # An http check of a port label: Nomad reaches this allocation's own address.
            assert check["type"] == "http", stem
            assert service["port"] in ports, f"{stem}: {service['port']} is not a port of the group"
            checked[service["port"]] = check["path"]
            assert check["check_restart"], stem
        if stem == "web":
            listen = config["args"][config["args"].index("--listen") + 1]
            assert ports["http"] == listen_port(listen) and checked["http"] == "/healthz"
        else:
            assert ports["ops"] == listen_port(env["JOBMESH_OPS_LISTEN"]) and checked["ops"] == "/healthz"
        if stem == "trigger":
            assert ports["http"] == listen_port(env["JOBMESH_HTTP_LISTEN"]) and checked["http"] == "/v1/health"


def test_nomad_config_comes_from_templates() -> None:
    for stem, spec in nomad_jobs().items():
        if stem == "nats":
            continue
        _, _, task = nomad_parts(spec)
        env = nomad_env(task)
        assert "nomadService" in env["JOBMESH_NATS_URL"] or "JOBMESH_NATS_URL" in env, stem
        destinations = {t["destination"] for t in task["template"]}
        assert "local/nats.env" in destinations, stem
        if stem in ("scheduler", "tracker"):
            assert "JOBMESH_DATABASE_URL" in env and "secrets/database.env" in destinations, stem


def test_nomad_executors_run_on_the_nodes_that_offer_themselves_with_their_attributes() -> None:
    _job, group, task = nomad_parts(nomad_jobs()["executor"])
    (constraint,) = group["constraint"]
    assert constraint["attribute"] == "${meta.jobmesh_executor}" and constraint["value"] == "true"
    env = nomad_env(task)
    assert env["JOBMESH_NODE_ID"] == "${node.unique.id}"
    assert env["JOBMESH_NODE_ZONE"] == "${node.datacenter}"
    assert 'env "attr.cpu.arch"' in env["JOBMESH_NODE_LABELS"]
    for name in ("JOBMESH_NODE_DATASETS", "JOBMESH_NODE_GPU", "JOBMESH_NODE_GPU_KIND", "JOBMESH_NODE_CPU_MILLI"):
        assert name in env, name


def test_nomad_provisioner_is_a_batch_job() -> None:
    job, _group, task = nomad_parts(nomad_jobs()["provision"])
    assert job["type"] == "batch"
    assert "service" not in task
    assert nomad_env(task)["JOBMESH_STREAM_REPLICAS"] == "3"


def test_nomad_nats_is_a_three_node_cluster_on_distinct_hosts() -> None:
    _job, group, task = nomad_parts(nomad_jobs()["nats"])
    assert group["count"] == 3
    assert any(c.get("operator") == "distinct_hosts" for c in group["constraint"])
    ports = {label: body["static"] for port in group["network"][0]["port"] for label, body in port.items()}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    templates = {t["destination"]: t for t in task["template"]}
    embedded = heredoc(templates["local/nats.conf"]["data"])
    assert embedded.strip() == (ROOT / deploygen.NATS_CLUSTER_CONF).read_text().strip()
    assert 'nomadService "jobmesh-nats-cluster"' in heredoc(templates["local/routes.conf"]["data"])
    names = {s["name"]: s for s in task["service"]}
    assert names["jobmesh-nats"]["port"] == "client" and names["jobmesh-nats-cluster"]["port"] == "cluster"
    (check,) = names["jobmesh-nats"]["check"]
    assert check["port"] == "monitor" and check["path"].startswith("/healthz")
    # The jobs find the cluster by the name this job registers.
    _, _, trigger = nomad_parts(nomad_jobs()["trigger"])
    assert 'nomadService "jobmesh-nats"' in nomad_env(trigger)["JOBMESH_NATS_URL"] or any(
        'nomadService "jobmesh-nats"' in heredoc(t["data"]) for t in trigger["template"]
    )


# --- NATS configuration, tested by the pinned nats-server ------------------------------


def _nats_test(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)], capture_output=True, text=True, timeout=30, env=env
    )


def with_credentials(config: Path, text: str) -> Path:
    """``text`` written to ``config``, with what its ``include`` of the authorization block
    finds beside it: the ``auth.conf`` of ``jobmesh auth issue`` (compose's node)."""
    config.write_text(text)
    include = nats_options(text)["include"]
    assert include == deploygen.AUTH_INCLUDE, include
    directory = config.parent / posixpath.dirname(include)
    commands.issue(directory, [source().credentials.compose.node], Settings().partitions)
    assert (directory / posixpath.basename(include)).is_file()
    return config


def test_the_compose_nats_config_is_valid(tmp_path: Path) -> None:
    config = with_credentials(tmp_path / "nats.conf", (ROOT / "deploy/nats/nats.conf").read_text())
    result = _nats_test(config)
    assert result.returncode == 0, result.stderr
    # The include is what makes it valid: without auth.conf beside it the server refuses it.
    (config.parent / deploygen.AUTH_INCLUDE).unlink()
    result = _nats_test(config)
    assert result.returncode != 0 and "auth.conf" in result.stderr


def test_the_cluster_nats_config_is_valid_with_its_routes(tmp_path: Path) -> None:
    config = with_credentials(tmp_path / "nats.conf", (ROOT / deploygen.NATS_CLUSTER_CONF).read_text())
    # What the routes template renders once the three servers have registered.
    (tmp_path / "routes.conf").write_text(
        "routes = [\n" + "".join(f"  nats-route://10.0.0.{i}:6222\n" for i in (1, 2, 3)) + "]\n"
    )
    result = _nats_test(config, env={"NATS_SERVER_NAME": "jobmesh-node-1"})
    assert result.returncode == 0, result.stderr
    (tmp_path / "routes.conf").write_text("routes = [\n]\n")  # before any has registered
    assert _nats_test(config, env={"NATS_SERVER_NAME": "jobmesh-node-1"}).returncode == 0


def test_a_bad_option_is_caught_by_the_same_check(tmp_path: Path) -> None:
    config = with_credentials(
        tmp_path / "nats.conf",
        (ROOT / "deploy/nats/nats.conf").read_text().replace("sync_interval: always", "sync_interval: alwayz"),
    )
    result = _nats_test(config)
    assert result.returncode != 0 and "sync_interval" in result.stderr


def _options(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        match = re.match(r"\s*(\w+)\s*[:=]\s*(\S+)\s*$", line.split("#", 1)[0])
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _bytes(size: str) -> int:
    # nats-server reads KB/MB/GB (and K/M/G) as powers of 1024.
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)B?", size.upper()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " KMGT".index(unit or " ")


@pytest.mark.parametrize("path", ["deploy/nats/nats.conf", "deploy/nats/cluster.conf"])
def test_nats_fsyncs_every_write_and_has_room_for_every_stream(path: str) -> None:
    options = _options((ROOT / path).read_text())
    assert options["sync_interval"] == "always"
    assert options["http_port"] == "8222"
    reserved = (
        sum(s.max_bytes for s in streams.STREAMS)
        + streams.STREAMS_BY_NAME[streams.STREAM_EVENTS_NAME].max_bytes  # JM_EXTERNAL has the events' limits
        + len(streams.BUCKETS) * streams.BUCKET_MAX_BYTES
        + sum(store.max_bytes for store in streams.OBJECT_STORES)
    )
    assert _bytes(options["max_file_store"]) >= reserved, f"{path}: {reserved / 2**30:.1f} GiB reserved"
    assert _bytes(options["max_payload"]) > streams.MAX_MSG_BYTES


def test_the_nats_images_are_the_server_the_configs_are_tested_with() -> None:
    version = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    (number,) = re.findall(r"v(\d+\.\d+\.\d+)", version)
    assert compose()["services"]["nats"]["image"] == f"nats:{number}-alpine"
    assert source().nomad.nats.image == f"nats:{number}-alpine"


def test_compose_interpolation_helper() -> None:
    assert interpolate("${A:-x}", {}) == "x"
    assert interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("a${B}", {"B": "b"}) == "ab"


def test_nomad_prometheus_scrapes_the_services_ops_ports() -> None:
    config = yaml.safe_load((ROOT / "deploy/nomad/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_nomad_tags"]
    for stem, spec in nomad_jobs().items():
        if stem in ("nats", "provision"):
            continue
        _, _, task = nomad_parts(spec)
        tagged = [s for s in task["service"] if re.fullmatch(keep["regex"], ",".join(s["tags"]))]
        if stem == "web":
            assert tagged == [], "jobmesh web has no /metrics"
        else:
            assert [s["port"] for s in tagged] == ["ops"], stem


def test_a_nats_server_leaves_in_lame_duck_mode_within_its_kill_timeout() -> None:
    _, _, task = nomad_parts(nomad_jobs()["nats"])
    options = _options((ROOT / deploygen.NATS_CLUSTER_CONF).read_text())
    lame_duck = duration_seconds(options["lame_duck_grace_period"]) + duration_seconds(options["lame_duck_duration"])
    assert task["kill_signal"] == "SIGUSR2"
    assert lame_duck < duration_seconds(task["kill_timeout"])
    # Nomad caps kill_timeout at the client's max_kill_timeout: the README says to raise it.
    assert 'max_kill_timeout = "60s"' in (ROOT / "deploy/README.md").read_text()
    assert duration_seconds(task["kill_timeout"]) <= 60


# --- credentials: every process its own NATS identity ------------------------------------


def test_compose_issues_the_keys_before_nats_and_nats_before_every_process() -> None:
    """credentials-init hands the new volume to the image's user, credentials writes the keys
    and exits, nats-server starts with them, the provisioner runs, then the services."""
    services = compose()["services"]
    credentials = credentials_service()
    init = services[deploygen.CREDENTIALS_INIT]
    volume = source().credentials.compose.volume
    # The init step owns the volume's root for the user every jobmesh container runs as.
    target = {path for path, (host, _) in _mounts(init).items() if host == volume}
    assert init["entrypoint"] == ["chown", f"{dockerfile_uid()}:{dockerfile_uid()}", *target], init["entrypoint"]
    assert init["restart"] == "no" and credentials["restart"] == "no"
    assert credentials["depends_on"] == {deploygen.CREDENTIALS_INIT: {"condition": "service_completed_successfully"}}
    # It writes where it mounts the volume, read-write.
    assert _mounts(credentials)[compose_credentials_dir()] == (volume, False)
    assert "healthcheck" not in credentials and "deploy" not in credentials, "a one-shot, not a service"
    assert (
        services["nats"]["depends_on"][deploygen.CREDENTIALS_SERVICE]["condition"] == "service_completed_successfully"
    )
    for name, service in jobmesh_services(compose()).items():
        if name == deploygen.CREDENTIALS_SERVICE:
            continue
        depends = service["depends_on"]
        assert depends[deploygen.CREDENTIALS_SERVICE]["condition"] == "service_completed_successfully", name
        assert depends["nats"]["condition"] == "service_healthy", name
        if name != "provision":
            assert depends["provision"]["condition"] == "service_completed_successfully", name
        # Its seed is in the volume, mounted read-only.
        assert _mounts(service)[compose_credentials_dir()] == (volume, True), name


def test_the_credentials_commands_parse_with_the_real_command_line() -> None:
    """`jobmesh auth issue` and `jobmesh provision` as compose runs them, parsed by the
    parser commands.py registers: every flag exists and means what the files rely on."""
    parser = argparse.ArgumentParser(prog="jobmesh")
    commands.register(parser.add_subparsers(dest="command", required=True))
    node = compose()["services"]["executor"]["environment"]["JOBMESH_NODE_ID"]

    def parse(command: list[str]) -> argparse.Namespace:
        assert command[0] == "jobmesh", command
        try:
            return parser.parse_args(command[1:])
        except SystemExit as exc:
            raise AssertionError(f"`{shlex.join(command)}` does not parse") from exc

    issue = parse(credentials_service()["command"])
    assert issue.fn is commands.run_issue
    assert issue.dir == Path(compose_credentials_dir())
    assert issue.node == [node], "the key is issued for the executor's node id"
    provision = parse(compose()["services"]["provision"]["command"])
    assert provision.fn is commands.run and provision.services is True
    assert provision.node == [node], "the provisioner creates that node's dispatch consumer"
    # The Nomad provisioner's expression gives the same flags, one --node per node.
    (config,) = nomad_parts(nomad_jobs()["provision"])[2]["config"]
    nomad = parse([config["command"], *nomad_provision_args(config["args"], ["n1", "n2"])])
    assert nomad.fn is commands.run and nomad.services is True and nomad.node == ["n1", "n2"]
    assert parse([config["command"], *nomad_provision_args(config["args"], [])]).node == []
    # The check above can fail: a flag the parser does not have is refused.
    with pytest.raises(AssertionError, match="does not parse"):
        parse([*credentials_service()["command"], "--partitions", "4"])


def test_auth_issue_with_composes_arguments_writes_every_seed_compose_names(issued: Path) -> None:
    """The credentials service's command, run: each seed file a compose process names is
    there, private, and a user seed; running it again keeps every seed (a second `up`)."""
    named = {
        name: svc["environment"][SEED_VARIABLE]
        for name, svc in jobmesh_services(compose()).items()
        if SEED_VARIABLE in svc.get("environment", {})
    }
    assert set(named) == set(jobmesh_services(compose())) - {deploygen.CREDENTIALS_SERVICE}
    for name, value in named.items():
        path = issued_path(value, issued)
        assert path.is_file(), f"{name}: `jobmesh auth issue` wrote no {path.name}"
        assert path.stat().st_mode & 0o777 == 0o600, f"{name}: {path.name} is not private"
        assert natsauth.read_seed(path).startswith(b"SU")
    assert (issued / commands.AUTH_FILE).is_file()
    before = {path.name: path.read_bytes() for path in issued.glob("*.nk")}
    again = run_compose_issue(issued, "--json")
    assert again.returncode == 0, again.stderr
    rows = {row["identity"]: row for row in json.loads(again.stdout)["identities"]}
    assert all(row["new"] == "no" for row in rows.values()), rows
    assert {path.name: path.read_bytes() for path in issued.glob("*.nk")} == before


def test_every_compose_process_connects_as_its_own_identity(issued: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process names the seed of the identity the code connects it as (the executor:
    executor-<its node>), whose public key auth.conf grants exactly that identity; no two
    share one, and only the provisioner has the provisioner's."""
    granted = granted_keys((issued / commands.AUTH_FILE).read_text())
    node = compose()["services"]["executor"]["environment"]["JOBMESH_NODE_ID"]
    seen: dict[str, str] = {}
    for name, svc in jobmesh_services(compose()).items():
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        for variable in OTHER_KEY_VARIABLES:
            assert variable not in env, f"{name}: {variable} hands it a key besides its own"
        if name == deploygen.CREDENTIALS_SERVICE:
            assert SEED_VARIABLE not in env, "the issuer connects to nothing"
            continue
        me = connects_as(svc["command"], env, monkeypatch)
        seed = issued_path(env[SEED_VARIABLE], issued)
        assert seed.name == f"{me}.nk", f"{name} connects as {me} with the seed of {seed.stem}"
        assert natsauth.public_key(natsauth.read_seed(seed)) == granted[me], f"{name}: auth.conf grants another key"
        assert me not in seen, f"{name} and {seen.get(me)} share the identity {me}"
        seen[me] = name
    assert seen == {
        "provisioner": "provision",
        "trigger": "trigger",
        "scheduler": "scheduler",
        "binder": "binder",
        "tracker": "tracker",
        permissions.executor_identity(node): "executor",
        "client": "web",
    }


def test_every_nomad_task_renders_its_own_seed_from_a_variable_only_it_may_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The seed file each task names is the identity the code connects it as, rendered into
    its secrets/ (0600, the image's user) from nomad/jobs/<job>/<group>/<task>: the one path
    Nomad lets that task alone read. The executor's is its node's item of that variable."""
    credentials = source().credentials.nomad
    read_by: dict[str, set[str]] = {}
    for stem, doc in nomad_jobs().items():
        job_name, job = only(doc["job"])
        group_name, group = only(job["group"])
        task_name, task = only(group["task"])
        for template in task.get("template", []):
            for path in re.findall(r'nomadVar "([^"]+)"', heredoc(template["data"])):
                read_by.setdefault(path, set()).add(job_name)
        if stem == "nats":
            continue
        env = nomad_env(task)
        for variable in OTHER_KEY_VARIABLES:
            assert variable not in env, f"{stem}: {variable} hands it a key besides its own"
        (config,) = task["config"]
        command = [config["command"]] + (config["args"] if isinstance(config.get("args"), list) else ["provision"])
        me = connects_as(command, env, monkeypatch)
        assert env[SEED_VARIABLE] == f"${{NOMAD_SECRETS_DIR}}/{me}.nk", stem
        templates = {t["destination"]: t for t in task["template"]}
        seed = templates[f"secrets/{me}.nk"]
        assert (seed["perms"], seed["uid"], seed["gid"]) == ("0600", dockerfile_uid(), dockerfile_uid()), stem
        assert seed["change_mode"] == "restart" and not seed.get("env"), stem
        own = f"nomad/jobs/{job_name}/{group_name}/{task_name}"
        data = heredoc(seed["data"])
        assert re.findall(r'nomadVar "([^"]+)"', data) == [own], f"{stem}: {data}"
        if stem == "executor":
            # The item named after the node, the same attribute JOBMESH_NODE_ID is.
            assert env["JOBMESH_NODE_ID"] == "${node.unique.id}" and me == "executor-${node.unique.id}"
            assert '(index . (env "node.unique.id")).Value' in data
        else:
            assert f"{{{{ .{credentials.seed_item} }}}}" in data, data
    # No job reads a variable of another job's: each path under nomad/jobs/<job> is its own.
    for path, jobs in read_by.items():
        parts = path.split("/")
        if len(parts) > 2:
            assert jobs == {parts[2]}, f"{path} is read by {sorted(jobs)}"
    assert read_by["nomad/jobs/jobmesh-provision/provision/provision"] == {"jobmesh-provision"}


def test_the_files_a_process_reads_itself_on_nomad_belong_to_the_images_user() -> None:
    """Nomad renders templates as root; a file the process opens (a seed, a secret) with a
    mode of its own must be the container user's, or the process cannot read it."""
    for stem, doc in nomad_jobs().items():
        if stem == "nats":
            continue
        for template in nomad_parts(doc)[2]["template"]:
            if template.get("perms"):
                assert template.get("uid") == dockerfile_uid() == template.get("gid"), (stem, template["destination"])


def test_nats_includes_the_authorization_block_that_is_issued() -> None:
    """Both NATS configurations include auth.conf beside them (nats-server resolves an
    include from the configuration's directory); compose mounts the volume the credentials
    service writes there, Nomad renders the NATS job's variable there and reloads it."""
    for path in ("deploy/nats/nats.conf", "deploy/nats/cluster.conf"):
        include = nats_options((ROOT / path).read_text())["include"]
        assert include == deploygen.AUTH_INCLUDE and posixpath.basename(include) == commands.AUTH_FILE, path
    nats = compose()["services"]["nats"]
    config = nats["command"][nats["command"].index("--config") + 1]
    auth = posixpath.join(posixpath.dirname(config), deploygen.AUTH_INCLUDE)
    mount = _mounts(nats)[posixpath.dirname(auth)]
    assert mount == (source().credentials.compose.volume, True), mount
    assert _mounts(credentials_service())[compose_credentials_dir()][0] == mount[0], "the volume the keys go to"
    _, _, task = nomad_parts(nomad_jobs()["nats"])
    (config_block,) = task["config"]
    args = config_block["args"]
    auth = posixpath.join(posixpath.dirname(args[args.index("--config") + 1]), deploygen.AUTH_INCLUDE)
    templates = {t["destination"]: t for t in task["template"]}
    template = templates[auth.lstrip("/")]
    assert 'nomadVar "nomad/jobs/jobmesh-nats/nats/nats"' in heredoc(template["data"])
    assert f".{source().credentials.nomad.auth_item}" in heredoc(template["data"])
    assert template["change_mode"] == "signal" and template["change_signal"] == "SIGHUP"


def test_the_readme_says_how_to_put_every_variable_the_jobs_read() -> None:
    """Each Nomad variable a job file reads has its `nomad var put` in deploy/README.md."""
    readme = (ROOT / "deploy/README.md").read_text()
    put = set(re.findall(r"nomad var put (?:-\S+ )*(\S+)", readme))
    paths = {
        path
        for doc in nomad_jobs().values()
        for template in nomad_parts(doc)[2].get("template", [])
        for path in re.findall(r'nomadVar "([^"]+)"', heredoc(template["data"]))
    }
    assert paths and paths <= put, f"no `nomad var put` for {sorted(paths - put)}"
