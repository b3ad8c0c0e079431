"""``python -m jobmesh.web``: the web server as a process configured by the environment.

What ``jobmesh dev``, compose and the tests start (a ``LocalCluster`` service process):
``JOBMESH_WEB_LISTEN``, ``JOBMESH_WEB_TOKEN`` or ``JOBMESH_WEB_TOKEN_FILE``, and
``JOBMESH_NATS_URL``, and ``JOBMESH_WEB_OPEN_ON_LOOPBACK=1`` to run without a token on
loopback (``jobmesh dev``); the same as ``jobmesh web`` with no flags.
"""

from __future__ import annotations

import os
import sys

from jobmesh.client.cli import run_command
from jobmesh.web.commands import run


def main() -> None:
    import argparse

    args = argparse.Namespace(
        listen=None,
        token_file=os.environ.get("JOBMESH_WEB_TOKEN_FILE") or None,
        nats_url=None,
        open_on_loopback=None,  # JOBMESH_WEB_OPEN_ON_LOOPBACK, read by run()
        wait=float(os.environ.get("JOBMESH_WEB_WAIT", "60")),
        json=False,
        fn=run,
    )
    sys.exit(run_command(args))


if __name__ == "__main__":
    main()
