"""Run the trigger service: ``python -m jobmesh.trigger``."""

from jobmesh.runtime.entrypoint import run_service
from jobmesh.trigger.service import provision_main, service_main


def main() -> None:
    run_service(service_main, "trigger", provision=provision_main)


if __name__ == "__main__":
    main()
