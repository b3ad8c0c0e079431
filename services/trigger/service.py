"""The trigger service: API submits in, JobSubmitted out.

It keeps a live view of ``jm_handlers`` to check a handler job's input at submit. Later
issues add event rules, schedules and workflow expansion here.
"""

from __future__ import annotations

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import SubmitRequest
from jobmesh.runtime.service import ResponderSpec, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing
from jobmesh.trigger.handlers import SubmitHandler
from jobmesh.trigger.handlerschemas import HandlerSchemas


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, answer submits until told to stop, then drain."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    schemas = HandlerSchemas(rt.js)
    rt.spawn(schemas.run(), "handler-schemas")
    rt.on_reconnect(schemas.restart)
    submit = SubmitHandler(rt.publisher, settings.partitions, schemas)
    await rt.serve(
        responders=[
            ResponderSpec(
                subjects.API_SUBMIT,
                Codec(SubmitRequest, settings.max_message_bytes),
                submit,
                queue="trigger",
            )
        ]
    )
