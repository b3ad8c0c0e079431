"""Every NATS configuration jobmesh ships fsyncs each write before acknowledging it.

``sync_interval: always`` inside the ``jetstream`` block: the files under deploy/ (compose's
server and the cluster's), the configuration the Nomad NATS job embeds, and what
``NatsServer`` and ``NatsCluster`` write for ``jobmesh dev``, the tests and the benchmark.
Without it nats-server flushes every two minutes and acknowledges writes that an OS crash
can still lose (docs/nats-cluster.md). The configurations are parsed, not grepped: the
option must sit in the ``jetstream`` block, outside any comment.

The shipped configurations also include the authorization block ``jobmesh auth issue``
writes (``credentials/auth.conf``, beside them): the tests that start one issue the keys
there first, and check the running server lets in those keys and no one else.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import nats
import pytest

from jobmesh.dev.servers import NatsCluster, NatsServer, free_port, nats_config, nats_server_binary, wait_for_port
from jobmesh.runtime.commands import AUTH_FILE, issue
from jobmesh.runtime.settings import Settings
from tests.test_deploy_files import ROOT, compose, heredoc, nomad_jobs

# Where both shipped configurations include the authorization block from, beside them.
AUTH_INCLUDE = "credentials/auth.conf"

_BLOCK_OPEN = re.compile(r"^([\w$]+)\s*[:=]?\s*\{\s*$")
_OPTION = re.compile(r"^([\w$]+)\s*(?:[:=]\s*|\s+)(.*?)\s*,?$")


def _strip_comment(line: str) -> str:
    """``line`` without a ``#`` or ``//`` comment (a quoted ``#`` stays)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" or line.startswith("//", i):
            return line[:i]
    return line


def options(text: str) -> dict[str, str]:
    """Each option of a nats-server configuration by its dotted path (``jetstream.sync_interval``).

    Enough of the format for these files: blocks ``name { ... }`` (also ``name: {``), one
    option per line, arrays (their items are skipped); comments are ignored.

    Raises:
        ValueError: when the braces do not balance, naming the line.
    """
    found: dict[str, str] = {}
    path: list[str] = []
    array_depth = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if array_depth:
            array_depth += line.count("[") - line.count("]")
            continue
        if line == "}":
            if not path:
                raise ValueError(f"line {number}: '}}' closes no block")
            path.pop()
            continue
        block = _BLOCK_OPEN.match(line)
        if block:
            path.append(block.group(1))
            continue
        option = _OPTION.match(line)
        if option:
            key, value = option.groups()
            if value.startswith("[") and value.count("[") > value.count("]"):
                array_depth = value.count("[") - value.count("]")
            found[".".join([*path, key])] = value.strip("\"'")
    if path or array_depth:
        raise ValueError(f"unclosed block {'.'.join(path) or '['} at the end")
    return found


def fsyncs_every_write(text: str) -> bool:
    """Whether a configuration with JetStream sets ``sync_interval: always`` in its block."""
    return options(text).get("jetstream.sync_interval") == "always"


def has_jetstream(text: str) -> bool:
    return any(key.startswith("jetstream.") for key in options(text))


# --- the configurations jobmesh ships ---------------------------------------------------


def shipped_files() -> dict[str, str]:
    """Every nats-server configuration file under deploy/."""
    return {str(path.relative_to(ROOT)): path.read_text() for path in sorted((ROOT / "deploy").rglob("*.conf"))}


def _labelled(blocks: list[dict]) -> list[dict]:
    """The bodies of labelled blocks (``job``, ``group``, ``task``) as python-hcl2 gives them."""
    return [body for block in blocks for body in block.values()]


def nomad_nats_configs() -> dict[str, str]:
    """The configuration each Nomad task that runs nats-server reads: the template rendered
    to the path its ``--config`` names."""
    found = {}
    for job_name, doc in nomad_jobs().items():
        for job in _labelled(doc["job"]):
            for group in _labelled(job.get("group", [])):
                for task in _labelled(group.get("task", [])):
                    args = [a for config in task.get("config", []) for a in config.get("args", [])]
                    if "nats-server" not in args:
                        continue
                    config = args[args.index("--config") + 1].lstrip("/")
                    templates = {t["destination"]: t for t in task.get("template", [])}
                    assert config in templates, f"{job_name}: nats-server reads {config}, which no template renders"
                    found[f"deploy/nomad/{job_name}.nomad.hcl:{config}"] = heredoc(templates[config]["data"])
    return found


def dev_configs(tmp: Path) -> dict[str, str]:
    """What ``NatsServer`` (``jobmesh dev``, the tests, the benchmark) and each member of a
    ``NatsCluster`` write; a hub that accepts leaf nodes as well."""
    cluster = NatsCluster(tmp / "cluster", leafnodes=True)
    configs = {"NatsServer": NatsServer(tmp / "single").config_text()}
    configs |= {f"NatsCluster {s.server_name}": s.config_text() for s in cluster.servers}
    configs["NatsServer hub"] = NatsServer(tmp / "hub", leafnode_port=7422).config_text()
    return configs


def test_every_shipped_file_and_the_nomad_job_fsync_every_write() -> None:
    configs = shipped_files() | nomad_nats_configs()
    # The discovery found what jobmesh ships, so an empty walk cannot pass.
    assert {"deploy/nats/nats.conf", "deploy/nats/cluster.conf"} <= configs.keys()
    assert any(name.startswith("deploy/nomad/nats.nomad.hcl:") for name in configs), configs.keys()
    for name, text in configs.items():
        assert has_jetstream(text), f"{name}: no jetstream block"
        assert fsyncs_every_write(text), f"{name}: jetstream has no `sync_interval: always`"


def test_every_shipped_config_includes_the_authorization_block() -> None:
    """Each configuration that runs JetStream for jobmesh lets in only the issued keys: it
    includes auth.conf at the top level (an include inside a block would scope it there)."""
    configs = shipped_files() | nomad_nats_configs()
    for name, text in configs.items():
        found = options(text)
        assert found.get("include") == AUTH_INCLUDE, f"{name}: no top-level include of {AUTH_INCLUDE}"
        assert AUTH_INCLUDE.endswith(AUTH_FILE)


def _serving(text: str, tmp: Path) -> tuple[str, int, int]:
    """A shipped configuration made to run here: its ports free ones, its store in ``tmp``;
    every other line (the include, JetStream's limits, fsync) as shipped."""
    client, monitor = free_port(), free_port()
    replaced = re.sub(r"(?m)^port: \d+$", f"port: {client}", text)
    replaced = re.sub(r"(?m)^http_port: \d+$", f"http_port: {monitor}", replaced)
    replaced = re.sub(r"(?m)^(\s*)store_dir: \S+$", rf"\g<1>store_dir: {tmp / 'store'}", replaced)
    assert replaced.count(str(client)) == 1 and replaced.count(str(monitor)) == 1, "the ports moved"
    assert str(tmp / "store") in replaced, "the store moved"
    return replaced, client, monitor


@pytest.fixture
def shipped_compose_server(tmp_path: Path):
    """deploy/nats/nats.conf running here, with auth.conf issued beside it as compose's
    credentials volume holds it; yields its URL, its /varz and the credentials directory."""
    text, client, monitor = _serving((ROOT / "deploy/nats/nats.conf").read_text(), tmp_path)
    config = tmp_path / "nats.conf"
    config.write_text(text)
    issue(tmp_path / "credentials", ["compose-1"], Settings().partitions)
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port("127.0.0.1", client, timeout=15, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as reply:
            varz = json.loads(reply.read())
        yield f"nats://127.0.0.1:{client}", varz, tmp_path / "credentials"
    finally:
        proc.terminate()
        proc.wait(15)


async def test_the_compose_config_starts_and_lets_in_the_issued_keys_only(shipped_compose_server, tmp_path) -> None:
    """The running server requires authentication, refuses a client without a key and one
    with a key it does not know, and takes the client's and the executor's issued keys."""
    url, varz, credentials = shipped_compose_server
    assert varz["auth_required"] is True
    assert varz["jetstream"]["config"]["sync_always"] is True
    strangers = tmp_path / "strangers"
    issue(strangers, [], Settings().partitions)  # valid seeds, unknown to this server
    for seed in (None, strangers / "client.nk"):
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(
                url,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                connect_timeout=3,
                **({"nkeys_seed": str(seed)} if seed else {}),
            )
    for identity in ("client", "executor-compose-1"):
        nc = await nats.connect(url, nkeys_seed=str(credentials / f"{identity}.nk"), connect_timeout=3)
        await nc.flush(timeout=3)
        await nc.close()


def test_compose_runs_nats_with_a_checked_file() -> None:
    nats = compose()["services"]["nats"]
    command = nats["command"]
    assert command[:2] == ["nats-server", "--config"] and len(command) == 3, command
    # No command-line JetStream switch that would run with a configuration of its own.
    mounted = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"] if v.startswith("./")}
    source = mounted[command[2]].removeprefix("./")
    assert source in shipped_files(), f"compose's nats-server reads {source}, not a checked file"


def test_the_dev_test_and_bench_servers_fsync_every_write(tmp_path: Path) -> None:
    for name, text in dev_configs(tmp_path).items():
        assert fsyncs_every_write(text), f"{name} writes no `sync_interval: always`:\n{text}"


def test_an_edge_server_keeps_no_jetstream_of_its_own(tmp_path: Path) -> None:
    # Nothing to fsync: its clients' writes are stored (and fsynced) by the hub.
    edge = NatsServer(tmp_path / "edge", leaf_remotes=["nats-leaf://127.0.0.1:7422"], jetstream=False)
    assert not has_jetstream(edge.config_text())


def test_the_written_configs_are_valid_for_the_pinned_server(tmp_path: Path) -> None:
    for name, text in dev_configs(tmp_path).items():
        config = tmp_path / f"{name.replace(' ', '-')}.conf"
        config.write_text(text)
        result = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_a_started_server_reports_that_it_syncs_always(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        # What the running server took from the file, not what the file says.
        assert server.monitor("/varz")["jetstream"]["config"]["sync_always"] is True
    finally:
        server.stop()


# --- the checker itself fails where it should --------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "jetstream {\n  store_dir: /data\n}\n",  # missing
        "jetstream {\n  store_dir: /data\n  # sync_interval: always\n}\n",  # only in a comment
        "sync_interval: always\njetstream {\n  store_dir: /data\n}\n",  # outside the block
        "jetstream {\n  sync_interval: 2m\n}\n",  # another interval
        "jetstream {\n  store_dir: /data\n}\ncluster {\n  sync_interval: always\n}\n",  # another block
    ],
)
def test_the_check_refuses_a_config_that_does_not_fsync_every_write(text: str) -> None:
    assert has_jetstream(text) and not fsyncs_every_write(text)


def test_the_check_reads_nested_blocks_arrays_and_equals() -> None:
    text = (
        "port = 4222\ncluster {\n  routes = [\n    nats-route://a:6222\n  ]\n}\n"
        'jetstream: {\n  store_dir: "/x # not a comment"\n  sync_interval = always\n}\n'
    )
    assert options(text)["jetstream.store_dir"] == "/x # not a comment"
    assert fsyncs_every_write(text)
    assert fsyncs_every_write(nats_config(port=1, monitor_port=2, store_dir=Path("/s")))
    with pytest.raises(ValueError, match="unclosed"):
        options("jetstream {\n  sync_interval: always\n")
