"""The executor: one node agent that registers its node, heartbeats, and runs bound attempts.

See ``README.md`` for what it consumes and publishes, and ``service.py`` for how the parts
fit together.
"""
