"""jobmesh: distributed job management over NATS JetStream.

The library holds what the five services share: messages, subjects, provisioning,
settings, errors and the one service runtime.
"""

__version__ = "0.1.0"
