"""The tracker service: the system of record and the read side of jobmesh.

It records every lifecycle event in the ``tracker`` Postgres schema (jobs, attempts,
events), answers ``jobs.get`` / ``jobs.list`` and announces state changes on the watch
subjects. See README.md for what it consumes and publishes.
"""
