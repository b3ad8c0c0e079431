"""Run the scheduler service: ``python -m jobmesh.scheduler``."""

from jobmesh.runtime.entrypoint import run_service
from jobmesh.scheduler.service import provision_main, service_main


def main() -> None:
    run_service(service_main, "scheduler", provision=provision_main)


if __name__ == "__main__":
    main()
