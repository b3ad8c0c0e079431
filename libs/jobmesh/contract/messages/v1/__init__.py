"""Version 1 of every jobmesh message. Within v1, changes are additive only.

Rules (msgspec schema evolution): a new field gets a default; a field never changes type;
``forbid_unknown_fields`` stays off so older readers accept newer writers.
"""

from jobmesh.contract.messages.v1.api import *  # noqa: F403
from jobmesh.contract.messages.v1.config import *  # noqa: F403
from jobmesh.contract.messages.v1.deadletter import *  # noqa: F403
from jobmesh.contract.messages.v1.jobs import *  # noqa: F403
from jobmesh.contract.messages.v1.nodes import *  # noqa: F403
from jobmesh.contract.messages.v1.triggers import *  # noqa: F403
from jobmesh.contract.messages.v1.workflows import *  # noqa: F403
