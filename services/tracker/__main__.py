"""Run the tracker service: ``python -m jobmesh.tracker`` (or ``jobmesh-tracker``)."""

from jobmesh.runtime.entrypoint import run_service
from jobmesh.tracker.service import provision_main, service_main


def main() -> None:
    run_service(service_main, "tracker", provision=provision_main)


if __name__ == "__main__":
    main()
