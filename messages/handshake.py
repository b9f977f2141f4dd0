"""The token proof: how a client and the service show each other they know the token.

With a ``token_file``, the token never crosses the wire. Each side sends a fresh random
nonce of :data:`NONCE_BYTES` (the client in ``hello``, the service in ``challenge``); the
client answers with :func:`client_proof` (``proof``), the service, once that matched, with
:func:`server_proof` (in ``welcome``). Both are HMAC-SHA256 keyed with the token's UTF-8
bytes over a label and the two nonces, so:

* a peer that does not know the token can produce neither proof;
* a proof seen once is useless again (the other side's nonce is fresh);
* the client's proof cannot be replayed as the service's, nor the reverse (distinct labels).

The service proves second, and only to a client that proved: a stranger gets nothing from
it to guess the token against offline. ``docs/protocol.md`` ("Token proof") spells the bytes.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = [
    "CLIENT_LABEL",
    "NONCE_BYTES",
    "PROOF_BYTES",
    "SERVER_LABEL",
    "client_proof",
    "matches",
    "server_proof",
]

NONCE_BYTES = 32
"""Length of each side's nonce."""
PROOF_BYTES = 32
"""Length of a proof (an HMAC-SHA256)."""
CLIENT_LABEL = b"sessionlane client proof\x00"
SERVER_LABEL = b"sessionlane server proof\x00"


def _proof(label: bytes, token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    message = label + client_nonce + server_nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def client_proof(token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the client sends in ``proof``: ``HMAC-SHA256(token, CLIENT_LABEL ‖ Nc ‖ Ns)``."""
    return _proof(CLIENT_LABEL, token, client_nonce, server_nonce)


def server_proof(token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the service sends in ``welcome``: ``HMAC-SHA256(token, SERVER_LABEL ‖ Nc ‖ Ns)``."""
    return _proof(SERVER_LABEL, token, client_nonce, server_nonce)


def matches(given: bytes | None, expected: bytes) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given, expected)
