"""The handler SDK: what code hosted on an executor ("AI blocks") imports.

A handler is a function registered with ``@handler("name")`` that takes one msgspec struct
and returns one; the executor's worker pool loads the modules that define handlers and
calls them for handler jobs. This package imports only the contract and the error tree:
it runs inside the node's sandbox, which has no network.
"""
