"""The dev nats-server starts even when a port picked as free is taken before it binds."""

from __future__ import annotations

import socket

import pytest

from jobmesh.dev.servers import NatsServer
from jobmesh.errors import Unavailable


@pytest.fixture
def taken_port():
    """A loopback port another socket holds (bound, not listening, so a connect to it
    fails as it would before the server listens)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_chosen_port_taken_before_the_bind_is_replaced(tmp_path, taken_port):
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.port = taken_port  # as if another process took it between free_port() and the bind
    server.start()
    try:
        assert server.port != taken_port
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as conn:
            assert conn.recv(4).startswith(b"INFO")
    finally:
        server.stop()


def test_a_fixed_port_that_is_taken_fails_and_says_why(tmp_path, taken_port):
    server = NatsServer(tmp_path / "nats", port=taken_port, log_file=tmp_path / "nats.log")
    with pytest.raises(Unavailable, match="address already in use"):
        server.start(timeout=5)
    assert server.port == taken_port
