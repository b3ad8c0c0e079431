"""Run the binder service: ``python -m jobmesh.binder``."""

from jobmesh.binder.service import provision_main, service_main
from jobmesh.runtime.entrypoint import run_service


def main() -> None:
    run_service(service_main, "binder", provision=provision_main)


if __name__ == "__main__":
    main()
