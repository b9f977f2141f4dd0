"""The syntax of config values that are used beyond the settings model: service addresses
and secret files, and the error every refused value raises (``ConfigError``).

``sessionlane.system.config`` re-exports every public name here; the clients, the gateway and the
CLI parse addresses with the same functions the settings are validated with: one syntax.

A ``cluster_key_file`` holds one base64 text line (standard alphabet, padding as usual; the
output of ``openssl rand -base64 32``) decoding to at least 32 bytes, and must not be readable,
writable or executable by group or others (``chmod 600``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import stat
from typing import Any, Literal

__all__ = [
    "CLUSTER_KEY_BYTES",
    "DEFAULT_PORT",
    "MAX_TOKEN_BYTES",
    "MIN_TOKEN_BYTES",
    "ConfigError",
    "Listen",
    "format_listen",
    "is_loopback",
    "normalize_listen",
    "parse_leader",
    "parse_listen",
    "parse_metrics_listen",
    "read_cluster_key_file",
    "read_token_file",
]

MAX_TOKEN_BYTES = 1024
"""Longest token accepted from ``token_file``."""
MIN_TOKEN_BYTES = 16
"""Shortest token accepted from ``token_file``: less could be guessed, even slowed down."""
DEFAULT_PORT = 7420
"""The gateway's TCP port when ``listen`` names none."""
# AF_UNIX sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107
CLUSTER_KEY_BYTES = 32
"""Least key material a ``cluster_key_file`` must hold (after base64 decoding)."""

Listen = tuple[Literal["tcp"], str, int] | tuple[Literal["unix"], str]


class ConfigError(ValueError):
    """A config value was refused. ``key`` is the config key, ``message`` says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"config key {self.key}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.message))


def parse_listen(listen: str) -> Listen:
    """Split a service address into ``("tcp", host, port)`` or ``("unix", path)``.

    Accepted forms, everywhere an address is taken (config ``listen``, ``--listen``, the
    clients): ``HOST:PORT`` and ``tcp://HOST:PORT`` (an IPv6 host in brackets,
    ``[::1]:7420``; port 0 asks the kernel for a free one) and ``unix:///absolute/path``.
    Anything else raises :class:`ConfigError` on key ``listen``.
    """
    listen = listen.strip()
    if listen.startswith("unix://"):
        path = listen[len("unix://") :]
        if not path.startswith("/"):
            raise ConfigError("listen", f"a unix socket path must be absolute (got {listen!r})")
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ConfigError(
                "listen", f"unix socket path longer than {_MAX_UNIX_PATH} bytes (got {listen!r})"
            )
        return ("unix", path)
    rest = listen[len("tcp://") :] if listen.startswith("tcp://") else listen
    if "://" in rest or "/" in rest:
        raise ConfigError(
            "listen", f"expected HOST:PORT, tcp://HOST:PORT or unix:///abs/path (got {listen!r})"
        )
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError("listen", f"an IPv6 host must be in brackets (got {listen!r})")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(
            "listen", f"expected HOST:PORT, tcp://HOST:PORT or unix:///abs/path (got {listen!r})"
        )
    port = int(port_text)
    if port > 65535:
        raise ConfigError("listen", f"port must be 0..65535 (got {port})")
    return ("tcp", host, port)


def format_listen(parsed: Listen) -> str:
    """The canonical spelling of a parsed address: ``tcp://HOST:PORT`` or ``unix:///path``."""
    if parsed[0] == "unix":
        return f"unix://{parsed[1]}"
    _, host, port = parsed
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def normalize_listen(listen: str) -> str:
    """``listen`` in its canonical spelling (``127.0.0.1:7420`` -> ``tcp://127.0.0.1:7420``).

    Two spellings of one address normalise to the same string, so a service started with
    one is found with the other. Raises :class:`ConfigError` like :func:`parse_listen`.
    """
    return format_listen(parse_listen(listen))


def parse_leader(leader: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``tcp://HOST:PORT`` (an IPv4 literal or a host name); raise
    ``ValueError`` if malformed. (A leader is a thespian admin: TCP over IPv4 only.)"""
    leader = leader.strip().removeprefix("tcp://")
    host, sep, port_text = leader.rpartition(":")
    if not sep or not host or ":" in host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, an IPv4 address or host name (got {leader!r})")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"port must be 1..65535 (got {port})")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback literal (names are not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name other than localhost: we do not resolve names at load, so it counts
        # as reachable from elsewhere.
        return False


def parse_metrics_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``tcp://HOST:PORT`` (IPv6 in brackets) or ``PORT`` -> ``(host, port)``.

    A bare port means 127.0.0.1; port 0 asks the kernel for a free one. Raises
    ``ValueError`` if malformed.
    """
    text = value.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 host must be in brackets (got {value!r})")
    if not sep or not host or not port_text.isdigit() or "/" in host:
        raise ValueError(f"expected HOST:PORT, tcp://HOST:PORT or PORT (got {value!r})")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535 (got {port})")
    return host, port


def access_advice(what: str, path: str, recursive: bool = False) -> str:
    """``what`` (a refusal of ``path`` to this process) with the owner and mode found and the
    ``chown`` that lets this process's effective uid in: a file mounted from a host (a
    container's token) is typically the host user's, 0600, and the service runs as another."""
    uid = os.geteuid()
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{what}: {exc.strerror or exc}"
    return (
        f"{what}: owned by uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):04o}; this service"
        f" runs as uid {uid}: chown {'-R ' if recursive else ''}{uid} {path}"
        f" (or run the service as uid {st.st_uid})"
    )


def unreadable(what: str, path: str, exc: OSError) -> str:
    """Why ``path`` could not be opened: for a permission refusal, :func:`access_advice`."""
    if isinstance(exc, PermissionError):
        return access_advice(what, path)
    return f"{what}: {exc.strerror or exc}"


def _read_private_file(
    path: str, key: str, *, cannot_read: str, exposed: str, limit: int = -1
) -> bytes:
    """The first ``limit`` bytes (all by default) of ``path``, a regular file that only its
    owner may read. Raises :class:`ConfigError` (``key``) when it cannot be read (saying
    ``cannot_read`` and why), is not a regular file, or grants group or other bits (saying
    what whoever reads it could do: ``exposed``)."""
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(limit)
    except OSError as exc:
        raise ConfigError(key, unreadable(cannot_read, path, exc)) from None
    if not stat.S_ISREG(mode):
        raise ConfigError(key, f"{path} is not a regular file")
    if mode & 0o077:
        raise ConfigError(
            key,
            f"{path} is accessible to other users (mode {stat.S_IMODE(mode):04o}): {exposed};"
            " chmod 600 it",
        )
    return data


def read_cluster_key_file(path: str) -> bytes:
    """The key material of a ``cluster_key_file``; raises :class:`ConfigError` (key
    ``cluster_key_file``) when it is unreadable, shared with other users, not base64 or short."""

    def refuse(why: str) -> ConfigError:
        return ConfigError("cluster_key_file", f"{path} {why}")

    text = _read_private_file(
        path,
        "cluster_key_file",
        cannot_read=f"{path} cannot be read",
        exposed="whoever reads the key can run code as this service's user",
    )
    try:
        key = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise refuse("is not base64 text (make one with: openssl rand -base64 32 > FILE)") from None
    if len(key) < CLUSTER_KEY_BYTES:
        raise refuse(
            f"holds {len(key)} bytes of key material; at least {CLUSTER_KEY_BYTES} are needed"
            " (openssl rand -base64 32 > FILE)"
        )
    return key


def read_token_file(path: str) -> str:
    """The token in ``path``, surrounding whitespace (a trailing newline) stripped.

    Raises :class:`ConfigError` (key ``token_file``) if it is unreadable, not a regular file,
    accessible to other users (group or other bits: whoever reads it is admitted), not UTF-8,
    shorter than :data:`MIN_TOKEN_BYTES` (guessable) or longer than :data:`MAX_TOKEN_BYTES`.
    The service (at start) and the client commands (``status``, ``stop``) read it alike.
    """

    def refuse(why: str) -> ConfigError:
        return ConfigError("token_file", f"{path} {why}")

    data = _read_private_file(
        path,
        "token_file",
        cannot_read=f"cannot read {path}",
        exposed="whoever reads the token is admitted as any client",
        limit=MAX_TOKEN_BYTES * 4 + 4096,
    )
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise refuse("is not UTF-8 text") from None
    if not token:
        raise refuse("is empty (make a token with: openssl rand -hex 32 > FILE)")
    size = len(token.encode())
    if size < MIN_TOKEN_BYTES:
        raise refuse(
            f"holds a {size}-byte token; at least {MIN_TOKEN_BYTES} bytes are needed, a shorter"
            " one can be guessed (make one with: openssl rand -hex 32 > FILE)"
        )
    if size > MAX_TOKEN_BYTES:
        raise refuse(
            f"holds a {size}-byte token; at most {MAX_TOKEN_BYTES} bytes: use a shorter one,"
            " e.g. openssl rand -hex 32"
        )
    return token
