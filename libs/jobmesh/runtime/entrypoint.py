"""The entry point every service's ``__main__`` calls: settings, logs, telemetry, run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Coroutine
from typing import Any

from jobmesh.runtime import logs, metrics
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

__all__ = ["run_service"]


ServiceMain = Callable[[Settings, Tracing], Coroutine[Any, Any, None]]


def run_service(
    main: ServiceMain, service: str, provision: ServiceMain | None = None, argv: list[str] | None = None
) -> None:
    """Read the settings, configure logs, traces and metrics, and run ``main`` on uvloop.

    Args:
        main: the service's coroutine (connect, serve until stopped, drain).
        service: its name (trigger, scheduler, binder, executor, tracker).
        provision: its part of the one-shot provisioner (``--provision``): its database
            tables and durable consumers, then exit. None for a service that has neither
            to prepare ahead (the executor's consumer is its node's own).
        argv: the command line's arguments (``sys.argv[1:]`` when omitted).
    """
    import uvloop

    parser = argparse.ArgumentParser(
        prog=f"jobmesh-{service}",
        description=f"The jobmesh {service} service, configured by JOBMESH_* and OTEL_* variables "
        "(docs/architecture.md, Configuration).",
    )
    if provision is not None:
        parser.add_argument(
            "--provision",
            action="store_true",
            help="create or update this service's database tables and durable consumers, then exit "
            "(what `jobmesh provision --services` runs for each service)",
        )
    args = parser.parse_args(argv)
    settings = Settings.from_env(service)
    logs.configure(service, settings.log_level, settings.log_format)
    if provision is not None and args.provision:
        uvloop.run(provision(settings, Tracing.off()))
        return
    tracing = Tracing.from_env(service)
    meter_provider = metrics.install(service, scrape=bool(settings.ops_listen))
    try:
        profile_dir = settings.profile_dir
        if not profile_dir:
            uvloop.run(main(settings, tracing))
            return
        # Profile before guessing: JOBMESH_PROFILE_DIR=/tmp/prof writes <service>-<pid>.prof
        # at a graceful stop, for `python -m pstats`.
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            uvloop.run(main(settings, tracing))
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{service}-{os.getpid()}.prof"))
    finally:
        # (The runtime flushes the tracer provider in its drain.) An unreachable OTLP
        # endpoint costs at most its export timeout here.
        if meter_provider is not None:
            meter_provider.shutdown()
