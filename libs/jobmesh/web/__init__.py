"""The HTTP API and the web dashboard: a client of the cluster, served by ``jobmesh web``."""
