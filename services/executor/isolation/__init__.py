"""How an executor contains what it runs: its probe of the node, rlimits, cgroups and the
bubblewrap sandbox, put together into the launch of one attempt's process."""
