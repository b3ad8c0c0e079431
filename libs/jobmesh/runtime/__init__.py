"""The one service runtime every jobmesh service runs on.

Connecting, provisioning, the pull consumer, batched publishing, ack/nak/term decided in
one place (``outcomes``), backoff, Postgres access and its error boundary, tracing,
settings, and the KV views that services watch (nodes, cluster configuration).

Layer rule: imports the contract and the error tree; never the services, the client or the
dev tooling.
"""
