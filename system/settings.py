"""The service's settings: one frozen, validated model (``Settings``).

Each field is a config key (``sessionlane.system.config`` loads them from defaults, a TOML file, the
environment and flags, and re-exports ``Settings``). Validators refuse a bad value with a
:class:`~sessionlane.system.config_syntax.ConfigError` naming the key; the cross-key rules (a
non-loopback address needs a token or a shared cluster key...) run once every field is known.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sessionlane.system.config_syntax import (
    DEFAULT_PORT,
    ConfigError,
    is_loopback,
    normalize_listen,
    parse_leader,
    parse_listen,
    parse_metrics_listen,
    read_cluster_key_file,
    read_token_file,
)

__all__ = ["Settings"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


_SHARE_A_KEY = (
    "members must share a secret. Set cluster_key_file (the leader's key file), or"
    " trusted_network = true only if the network and this machine are as trusted as this"
    " account (frames are then not authenticated: anyone who reaches a port can run code here)."
)


class Settings(BaseModel):
    """Validated service settings. Frozen: share it freely, never patch it at run time."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    roots: list[str] = []
    """Directories whose transcripts may be served; each is stored as its realpath."""
    listen: str = "tcp://127.0.0.1:7420"
    """Gateway address: ``HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:///abs/path``; stored in
    its canonical spelling (``tcp://HOST:PORT``, see :func:`normalize_listen`)."""
    token_file: str | None = None
    """File whose (stripped) content clients must present in ``hello``."""
    max_hold_ms: int = 300_000
    """A lease held longer is revoked (reason ``max_hold``)."""
    wait_timeout_ms: int = 600_000
    """Default time a waiting acquire queues before ``lease_timeout``."""
    aging_ms: int = 10_000
    """A lower-priority waiter is promoted after waiting this long."""
    idle_ms: int = 60_000
    """A SessionFile actor with no holder, queue or traffic this long is passivated."""
    durability: Literal["fsync", "flush"] = "fsync"
    """``fsync``: fdatasync before acknowledging an append; ``flush``: handed to the OS only."""
    max_record_bytes: int = 1_048_576
    """Largest single JSONL record accepted."""
    max_frame_bytes: int = 8_388_608
    """Largest wire frame accepted."""
    max_queue: int = 256
    """Most waiters per path; one more gets ``queue_full``."""
    legacy_lock: bool = False
    """Also take the runtime's ``<file>.lock`` around each write."""
    keepalive_ms: int = 10_000
    """Keepalive period; a connection silent for three periods is dead and its lanes go."""
    suffixes: list[str] = [".jsonl"]
    """Allowed transcript file suffixes."""
    admin_port: int | None = None
    """thespian admin port; ``None`` picks a fresh free port at each start. Required to join a
    convention (``leader``), and what other members join when this one leads."""
    bind_host: str = "127.0.0.1"
    """The IPv4 address every thespian port listens on (and the gateway, unless ``listen`` is
    set). Anything but loopback needs ``cluster_key_file`` or ``trusted_network = true``."""
    leader: str | None = None
    """``HOST:PORT`` of the convention leader's admin to join; ``None``: lead (or stand alone)."""
    member_timeout_ms: int = 2_000
    """A convention member silent this long is declared lost: its paths answer
    ``unavailable`` and the leases held there are reported revoked."""
    trusted_network: bool = False
    """Without ``cluster_key_file``: send thespian's frames unauthenticated (so conventions work
    without a key) and allow its ports beyond loopback. They then unpickle whatever arrives:
    anyone who can reach them, every local user included, can run code as this service's user,
    so the network and the machine must be as trusted as the user account. With a key it
    changes nothing."""
    log_level: str = "INFO"
    """Level of sessionlane's own loggers."""
    max_files: int = 256
    """Most live SessionFiles (one OS process and a few descriptors each); a request for one
    more file is refused ``too_many_files`` while the live ones keep working."""
    max_connections: int = 512
    """Most open gateway connections; one more is refused and closed."""
    reclaim_grace_ms: int = 10_000
    """After a start, how long a client that held a lease before the restart has to reconnect
    and take it back (same lease, same fence); nobody else is granted that file meanwhile.
    0: no grace (a restart revokes every lease, as before)."""
    hello_timeout_ms: int = 5_000
    """A gateway connection that has not completed its ``hello`` this long after it was
    accepted is closed."""
    cluster_key_file: str | None = None
    """A 0600 file holding the secret every thespian frame is authenticated with (base64 text
    of at least 32 bytes), shared by the members of a convention. Unset: a random secret per
    service start, which no other process knows."""
    allow_other_users: bool = False
    """Without a ``token_file`` the gateway serves only peers running as the service's own
    user. ``true`` admits every local user without a token."""
    direct_channels: bool = True
    """Offer a local client that asks for them direct channels to the files it leases
    (``docs/direct-channel.md``): its lease cycles skip the gateway. ``false``: every request
    goes through the gateway."""
    allow_overlap: bool = False
    """Start even if another live service serves a root that equals, contains or lies inside
    one of ours. Files are still served by one owner at a time (kernel lock): the other
    service's files answer ``unavailable`` here."""
    memory_merge: bool = False
    """Have each SessionFile's process opt in to the kernel's samepage merging (KSM), so the
    pages the files' processes hold alike are kept once (``sessionlane.actors.page_merge``).
    Needs Linux 6.4+ and ``/sys/kernel/mm/ksm/run`` = 1 (set by root); a timing side channel
    to other local users who opt in too, so only for a machine they do not share."""
    channel_loop_ms: int = 50
    """How long a SessionFile's process may serve its channel sockets in one turn, waiting for
    them itself while thespian has nothing to do, before thespian's loop gets a pass
    (``docs/channel-loop.md``); 0: a thespian pass for every readable socket, as before."""
    metrics_listen: str | None = None
    """``HOST:PORT`` (or ``tcp://HOST:PORT``, or a bare port on 127.0.0.1) where the
    supervisor serves Prometheus metrics at ``/metrics``; ``None``: no metrics endpoint."""

    @field_validator("roots")
    @classmethod
    def _roots_are_directories(cls, roots: list[str]) -> list[str]:
        canonical: list[str] = []
        for root in roots:
            if not root:
                raise ValueError("an empty root is not a directory")
            real = os.path.realpath(root)
            if not os.path.isdir(real):
                raise ValueError(f"{root!r} is not an existing directory")
            if real not in canonical:
                canonical.append(real)
        return canonical

    @field_validator("listen")
    @classmethod
    def _listen_parses(cls, listen: str) -> str:
        try:
            return normalize_listen(listen)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator(
        "max_hold_ms",
        "wait_timeout_ms",
        "aging_ms",
        "idle_ms",
        "max_record_bytes",
        "max_frame_bytes",
        "max_queue",
        "keepalive_ms",
        "max_files",
        "max_connections",
        "hello_timeout_ms",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be > 0 (got {value})")
        return value

    @field_validator("reclaim_grace_ms")
    @classmethod
    def _grace(cls, value: int) -> int:
        if not 0 <= value <= 600_000:
            raise ValueError(f"must be 0..600000 (got {value})")
        return value

    @field_validator("channel_loop_ms")
    @classmethod
    def _channel_loop(cls, value: int) -> int:
        if not 0 <= value <= 1_000:
            raise ValueError(f"must be 0..1000 (got {value})")
        return value

    @field_validator("member_timeout_ms")
    @classmethod
    def _member_timeout(cls, value: int) -> int:
        # Members beat every quarter of it: below this the beats would be a busy loop.
        if value < 200:
            raise ValueError(f"must be >= 200 (got {value})")
        return value

    @field_validator("admin_port")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value <= 65535:
            raise ValueError(f"must be 1..65535 (got {value})")
        return value

    @field_validator("bind_host")
    @classmethod
    def _bind_host(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"must be an IPv4 address literal (got {value!r})") from None

    @field_validator("leader")
    @classmethod
    def _leader(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = parse_leader(value)
        return f"{host}:{port}"  # one spelling, whichever was given

    @field_validator("suffixes")
    @classmethod
    def _suffixes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one suffix is required")
        for suffix in value:
            if not suffix.startswith(".") or len(suffix) < 2 or "/" in suffix:
                raise ValueError(f"a suffix looks like '.jsonl' (got {suffix!r})")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_metrics_listen(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)} (got {value!r})")
        return level

    @field_validator("token_file")
    @classmethod
    def _token_file_readable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        read_token_file(value)
        return os.path.abspath(value)

    @field_validator("cluster_key_file")
    @classmethod
    def _cluster_key_usable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        read_cluster_key_file(value)
        return os.path.abspath(value)

    @model_validator(mode="before")
    @classmethod
    def _listen_follows_bind_host(cls, data: Any) -> Any:
        """The gateway listens on ``bind_host`` unless ``listen`` names another address."""
        if isinstance(data, dict) and "listen" not in data and data.get("bind_host"):
            host = data["bind_host"]
            if isinstance(host, str) and not is_loopback(host):
                return {**data, "listen": f"tcp://{host}:{DEFAULT_PORT}"}
        return data

    @model_validator(mode="after")
    def _thespian_ports_need_a_trusted_network(self) -> Settings:
        """Ports beyond loopback, and a convention, need a shared key or a trusted network."""
        # pydantic wraps these in a ValidationError; load_settings unwraps them (loc is empty).
        keyed = self.cluster_key_file is not None or self.trusted_network
        if not is_loopback(self.bind_host) and not keyed:
            raise ConfigError(
                "bind_host",
                f"{self.bind_host} is not a loopback address: set cluster_key_file (a 0600 key"
                " file shared by the members, which authenticates every frame), or"
                " trusted_network = true only if that network is as trusted as this account"
                " (thespian's ports then unpickle whatever reaches them).",
            )
        if self.leader is None:
            return self
        host, _ = parse_leader(self.leader)
        if not is_loopback(host) and not keyed:
            raise ConfigError("leader", f"{self.leader} is beyond this machine: {_SHARE_A_KEY}")
        if not is_loopback(host) and is_loopback(self.bind_host):
            raise ConfigError(
                "bind_host",
                f"a leader at {self.leader} cannot reach ports on {self.bind_host}: set"
                " bind_host to this machine's address on the leader's network",
            )
        if self.admin_port is None:
            raise ConfigError(
                "admin_port",
                "a convention member needs a fixed admin port: bind_host:admin_port is its"
                " identity, and a restarted member takes its roots back only under the same one",
            )
        if not keyed:
            # Each service's frames carry a MAC under its own random secret otherwise.
            raise ConfigError("leader", f"{self.leader} is another service: {_SHARE_A_KEY}")
        return self

    @model_validator(mode="after")
    def _remote_listen_needs_token(self) -> Settings:
        parsed = parse_listen(self.listen)
        if parsed[0] == "tcp" and not is_loopback(parsed[1]) and self.token_file is None:
            # pydantic wraps this in a ValidationError; load_settings unwraps it (loc is empty).
            raise ConfigError(
                "listen",
                f"{self.listen} is reachable beyond this machine: set token_file"
                " (clients must then prove the token) or listen on 127.0.0.1",
            )
        return self
