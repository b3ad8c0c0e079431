"""The client side: the Python client (``Client``) and the ``jobmesh`` command line.

Clients reach the cluster only through the contract's subjects, exactly as any other
integrator would. What a job's state means to a person (why it waits, what counts as
held) lives here in ``jobstate``, not in the print code.

Layer rule: imports only the contract and the error tree (checked by import-linter).
"""

from jobmesh.client.client import Client

__all__ = ["Client"]
