"""``python -m jobmesh.executor``: read settings, install uvloop, run the executor."""

from __future__ import annotations

from jobmesh.executor.service import provision_main, service_main
from jobmesh.runtime.entrypoint import run_service


def main() -> None:
    """Console-script entry point (``jobmesh-executor``)."""
    run_service(service_main, "executor", provision=provision_main)


if __name__ == "__main__":
    main()
