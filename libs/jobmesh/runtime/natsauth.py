"""NATS credentials: one nkey per identity, and the server's authorization block.

An nkey is an ed25519 key pair: the server's configuration holds only public keys, and
each process holds its own seed (the private half) in a file of mode 0600 or a variable.
Nothing secret is in the server's configuration, and no secret is ever on a command line.
The ``nkeys`` library (the NATS project's) encodes seeds and signs the server's challenge.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]

from jobmesh.contract.permissions import Permissions, inbox_of
from jobmesh.runtime.settings import Settings


def new_seed() -> bytes:
    """A fresh user nkey seed (``SU...``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key (``U...``) of a user seed."""
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def _strings(items: Iterable[str]) -> str:
    # JSON strings are valid in the nats-server configuration syntax, quotes and all, so
    # a subject with '$' or '>' needs no escaping of its own.
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def user_entry(key: str, permissions: Permissions) -> str:
    """One ``users`` entry of the authorization block: an nkey and its allow lists."""
    lines = [
        "    {",
        f"      # {permissions.identity}",
        f"      nkey: {json.dumps(key)}",
        "      permissions: {",
        f"        publish: {{ allow: {_strings(permissions.publish)} }}",
        f"        subscribe: {{ allow: {_strings(permissions.subscribe)} }}",
    ]
    if permissions.responds:
        # Answer requests on the reply subject each one names (another identity's inbox),
        # once per request and within a minute.
        lines.append('        allow_responses: { max: 1, expires: "1m" }')
    lines += ["      }", "    }"]
    return "\n".join(lines)


def authorization_block(users: Mapping[str, Permissions]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server configuration.

    Args:
        users: each identity's public key and its permissions.
    """
    entries = "\n".join(user_entry(key, perms) for key, perms in users.items())
    return "authorization {\n  users = [\n" + entries + "\n  ]\n}\n"


def write_seed(path: Path, seed: bytes) -> None:
    """Write a seed readable by its owner only (created 0600, never wider for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(seed + b"\n")


def read_seed(path: Path) -> bytes:
    """A seed from its file (surrounding whitespace ignored).

    Raises:
        ValueError: naming the file, when it holds no user seed.
    """
    seed = path.read_bytes().strip()
    if not seed.startswith(b"SU"):
        raise ValueError(f"{path}: not a NATS user nkey seed (it should start with 'SU')")
    return seed


def tls_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client TLS context that trusts ``ca`` (the system's roots when empty) and, for
    mutual TLS, presents ``cert`` and ``key``."""
    context = ssl.create_default_context(cafile=ca or None)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def connect_options(settings: Settings) -> dict[str, Any]:
    """The credentials and TLS part of ``nats.connect``'s arguments for this process.

    Every process uses its identity's own inbox prefix, so a permission can confine the
    replies it may read to its own; with a seed it signs the server's challenge with it.
    """
    options: dict[str, Any] = {"inbox_prefix": inbox_of(settings.identity)}
    if settings.nats_nkey_file:
        options["nkeys_seed"] = settings.nats_nkey_file
    elif settings.nats_nkey:
        options["nkeys_seed_str"] = settings.nats_nkey.strip()
    if settings.nats_tls_ca or settings.nats_tls_cert or any(url.startswith("tls://") for url in settings.nats_servers):
        options["tls"] = tls_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
    return options
