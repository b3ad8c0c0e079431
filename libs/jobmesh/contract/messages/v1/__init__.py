"""Version 1 of every jobmesh message. Within v1, changes are additive only.

Rules (msgspec schema evolution): a new field gets a default; a field never changes type;
every field says in ``Meta(description=...)`` its unit, its default and what empty means.
Events, replies and records keep ``forbid_unknown_fields`` off, so older readers accept newer
writers; requests (what a client sends to an ``api.*`` subject) turn it on, as a field the
service does not know is a typo to refuse, not a newer writer to humour. The check against
the released schemas (``make check-schemas``) enforces all of this.
"""

from jobmesh.contract.messages.v1.api import *  # noqa: F403
from jobmesh.contract.messages.v1.config import *  # noqa: F403
from jobmesh.contract.messages.v1.deadletter import *  # noqa: F403
from jobmesh.contract.messages.v1.jobs import *  # noqa: F403
from jobmesh.contract.messages.v1.nodes import *  # noqa: F403
from jobmesh.contract.messages.v1.triggers import *  # noqa: F403
from jobmesh.contract.messages.v1.workflows import *  # noqa: F403
