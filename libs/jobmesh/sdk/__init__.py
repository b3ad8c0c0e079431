"""The handler SDK: what code hosted on an executor ("AI blocks") imports.

A handler is a function registered with ``@handler("name")`` that takes one msgspec struct
and returns one; the executor's worker pool loads the modules that define handlers and
calls them for handler jobs. This package imports only the contract and the error tree:
it runs inside the node's sandbox, which has no network.

    import msgspec
    from jobmesh.sdk import Context, handler

    class Square(msgspec.Struct):
        n: int

    class Squared(msgspec.Struct):
        value: int

    @handler("square")
    def square(request: Square, ctx: Context) -> Squared:
        ctx.progress(1.0, "done")
        return Squared(request.n * request.n)

``python -m jobmesh.sdk.worker`` is the worker process the pool starts (see
:mod:`jobmesh.sdk.worker`); docs/handlers.md is the guide.
"""

from jobmesh.sdk.context import Context
from jobmesh.sdk.registry import DEFAULT_REGISTRY, Handler, Registry, handler, handler_info

__all__ = ["DEFAULT_REGISTRY", "Context", "Handler", "Registry", "handler", "handler_info"]
