"""The ``jobmesh`` command line."""

from jobmesh.client.cli.commands import main

__all__ = ["main"]
