"""The contract: what goes over the wire, and nothing else.

Subjects, message ids, streams and buckets (as data), the channel table the AsyncAPI
document is generated from, the versioned messages (``messages/v1``), the codec, strict
twins and job-spec validation. Anything that publishes or consumes a jobmesh message in any
language needs only what is described here.

Layer rule: this package imports only msgspec and :mod:`jobmesh.errors`; never the runtime,
the services, the client or the dev tooling (checked by import-linter in ``make lint``).
"""
