"""Run the trigger service: ``python -m jobmesh.trigger``."""

from jobmesh.runtime.entrypoint import run_service
from jobmesh.trigger.service import service_main


def main() -> None:
    run_service(service_main, "trigger")


if __name__ == "__main__":
    main()
