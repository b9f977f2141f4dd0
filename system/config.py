"""Service settings: one frozen model, loaded from defaults, a TOML file, the environment, flags.

Precedence, lowest first: the defaults below < the TOML file < ``SESSIONLANE_<KEY>``
environment variables < overrides (CLI flags; ``None`` means "flag not given"). Every value
is validated once, at load; a bad one raises :class:`ConfigError` naming the key, so a service
never starts half-configured. Risky but legal combinations come back as warnings for the
caller to print.

Environment values are strings: integers are parsed as such, booleans accept
``true/false/1/0/yes/no``, lists are either a JSON array or ``os.pathsep``-separated, and an
empty value for an optional key (``token_file``, ``admin_port``) means "unset". Relative
``roots``, ``token_file`` and ``cluster_key_file`` in the TOML file are relative to the file's
directory; from the environment or flags they are relative to the working directory.

A ``cluster_key_file`` holds one base64 text line (standard alphabet, padding as usual; the
output of ``openssl rand -base64 32``) decoding to at least 32 bytes, and must not be readable,
writable or executable by group or others (``chmod 600``).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

__all__ = [
    "ENV_PREFIX",
    "MAX_TOKEN_BYTES",
    "NON_CONFIG_ENV",
    "ConfigError",
    "Listen",
    "Settings",
    "format_listen",
    "load_settings",
    "normalize_listen",
    "parse_leader",
    "parse_listen",
    "parse_metrics_listen",
    "read_cluster_key",
    "read_token",
    "read_token_file",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "SESSIONLANE_"
NON_CONFIG_ENV = frozenset({"SESSIONLANE_CONFIG", "SESSIONLANE_TEST_TAG"})
"""``SESSIONLANE_*`` variables that are not config keys and therefore not refused.

``SESSIONLANE_CONFIG`` names the TOML file when ``load_settings`` gets none;
``SESSIONLANE_TEST_TAG`` marks the processes of a test run (``tests/leftovers.py``).
"""

MAX_TOKEN_BYTES = 1024
"""Longest token accepted from ``token_file``."""
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEFAULT_PORT = 7420
# AF_UNIX sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107
CLUSTER_KEY_BYTES = 32
"""Least key material a ``cluster_key_file`` must hold (after base64 decoding)."""

Listen = tuple[Literal["tcp"], str, int] | tuple[Literal["unix"], str]


_SHARE_A_KEY = (
    "members must share a secret. Set cluster_key_file (the leader's key file), or"
    " trusted_network = true only if the network and this machine are as trusted as this"
    " account (frames are then not authenticated: anyone who reaches a port can run code here)."
)


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name other than localhost: we do not resolve names at load, so it counts
        # as reachable from elsewhere.
        return False


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
    allow_overlap: bool = False
    """Start even if another live service serves a root that equals, contains or lies inside
    one of ours. Files are still served by one owner at a time (kernel lock): the other
    service's files answer ``unavailable`` here."""
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
        _read_cluster_key_file(value)
        return os.path.abspath(value)

    @model_validator(mode="before")
    @classmethod
    def _listen_follows_bind_host(cls, data: Any) -> Any:
        """The gateway listens on ``bind_host`` unless ``listen`` names another address."""
        if isinstance(data, dict) and "listen" not in data and data.get("bind_host"):
            host = data["bind_host"]
            if isinstance(host, str) and not _is_loopback(host):
                return {**data, "listen": f"tcp://{host}:{_DEFAULT_PORT}"}
        return data

    @model_validator(mode="after")
    def _thespian_ports_need_a_trusted_network(self) -> Settings:
        """Ports beyond loopback, and a convention, need a shared key or a trusted network."""
        # pydantic wraps these in a ValidationError; load_settings unwraps them (loc is empty).
        keyed = self.cluster_key_file is not None or self.trusted_network
        if not _is_loopback(self.bind_host) and not keyed:
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
        if not _is_loopback(host) and not keyed:
            raise ConfigError("leader", f"{self.leader} is beyond this machine: {_SHARE_A_KEY}")
        if not _is_loopback(host) and _is_loopback(self.bind_host):
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
        if parsed[0] == "tcp" and not _is_loopback(parsed[1]) and self.token_file is None:
            # pydantic wraps this in a ValidationError; load_settings unwraps it (loc is empty).
            raise ConfigError(
                "listen",
                f"{self.listen} is reachable beyond this machine: set token_file"
                " (clients must then present the token) or listen on 127.0.0.1",
            )
        return self


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


def read_token(settings: Settings) -> str | None:
    """The token clients must present, or ``None`` when ``token_file`` is unset.

    Re-read at each call so a rotated token takes effect without a restart. Raises
    :class:`ConfigError` (key ``token_file``) if the file became unreadable or empty.
    """
    if settings.token_file is None:
        return None
    return read_token_file(settings.token_file)


def read_cluster_key(settings: Settings) -> bytes | None:
    """The secret thespian frames are authenticated with, or ``None`` when
    ``cluster_key_file`` is unset. Raises :class:`ConfigError` (key ``cluster_key_file``) if
    the file became unusable since the settings were loaded."""
    if settings.cluster_key_file is None:
        return None
    return _read_cluster_key_file(settings.cluster_key_file)


def _read_cluster_key_file(path: str) -> bytes:
    def refuse(why: str) -> ConfigError:
        return ConfigError("cluster_key_file", f"{path} {why}")

    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            text = fh.read()
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise refuse("is not a regular file")
    if mode & 0o077:
        raise refuse(
            f"is accessible to other users (mode {stat.S_IMODE(mode):04o}): whoever reads the"
            " key can run code as this service's user; chmod 600 it"
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

    Raises :class:`ConfigError` (key ``token_file``) if it is unreadable, not UTF-8, empty or
    longer than :data:`MAX_TOKEN_BYTES` (a client's hello must fit in the few KiB the gateway
    buffers before it: a longer token would lock every client out).
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("token_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("token_file", f"{path} is not UTF-8 text") from None
    if not token:
        raise ConfigError("token_file", f"{path} is empty")
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise ConfigError(
            "token_file",
            f"{path} holds a {len(token.encode())}-byte token; at most {MAX_TOKEN_BYTES} bytes"
            " (a hello must fit in the 4 KiB the gateway reads before it): use a shorter one,"
            " e.g. openssl rand -hex 32",
        )
    return token


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[Settings, list[str]]:
    """Load and validate settings; return them with human-readable warnings.

    ``config_file`` defaults to ``$SESSIONLANE_CONFIG`` (none if unset); ``env`` defaults to
    ``os.environ``. Unknown keys in the file, unknown ``SESSIONLANE_*`` variables (other than
    :data:`NON_CONFIG_ENV`) and unknown override names are refused. Every failure raises
    :class:`ConfigError`.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    merged: dict[str, object] = {}
    origin: dict[str, str] = {}

    if config_file is None:
        config_file = environ.get("SESSIONLANE_CONFIG") or None
    if config_file is not None:
        for key, value in _read_toml(Path(config_file)).items():
            merged[key] = value
            origin[key] = f"in {config_file}"

    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in Settings.model_fields or name != ENV_PREFIX + key.upper():
            raise ConfigError(key, f"unknown environment variable {name}{_suggest(key)}")
        merged[key] = _parse_env(key, text)
        origin[key] = f"from {name}"

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in Settings.model_fields:
            raise ConfigError(key, f"unknown setting{_suggest(key)}")
        merged[key] = list(value) if isinstance(value, tuple) else value
        origin[key] = "from the command line"

    settings = _validate(merged, origin)
    return settings, _warnings(settings)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config_file", f"{path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in Settings.model_fields:
            raise ConfigError(key, f"unknown key in {path}{_suggest(key)}")
    # Paths in a config file are relative to the file, as a reader of the file expects.
    base = path.resolve().parent
    roots = data.get("roots")
    if isinstance(roots, list):
        data["roots"] = [
            str(base / r) if isinstance(r, str) and r and not os.path.isabs(r) else r for r in roots
        ]
    for key in ("token_file", "cluster_key_file"):
        value = data.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            data[key] = str(base / value)
    return data


def _parse_env(key: str, text: str) -> object:
    """Turn one environment string into the type the key's field expects."""
    annotation = Settings.model_fields[key].annotation
    raw = text.strip()
    if annotation in (int | None, str | None) and raw == "":
        return None
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(key, f"expected true/false/1/0/yes/no (got {text!r}) [from {_env(key)}]")
    if annotation in (int, int | None):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                key, f"expected an integer (got {text!r}) [from {_env(key)}]"
            ) from None
    if annotation == list[str]:
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(key, f"bad JSON array: {exc} [from {_env(key)}]") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(key, f"expected a JSON array of strings [from {_env(key)}]")
            return value
        return [part for part in raw.split(os.pathsep) if part]
    return text


def _env(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _validate(merged: dict[str, object], origin: Mapping[str, str]) -> Settings:
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            key, message = cause.key, cause.message
        else:
            key = str(first["loc"][0]) if first["loc"] else "settings"
            message = str(cause) if isinstance(cause, ValueError) else first["msg"]
            if not isinstance(cause, ValueError) and "input" in first:
                message = f"{message} (got {first['input']!r})"
        where = origin.get(key)
        raise ConfigError(key, f"{message} [{where}]" if where else message) from None


def _warnings(settings: Settings) -> list[str]:
    warnings: list[str] = []
    if settings.wait_timeout_ms < settings.max_hold_ms:
        warnings.append(
            f"wait_timeout_ms ({settings.wait_timeout_ms}) is shorter than max_hold_ms"
            f" ({settings.max_hold_ms}): a waiter can give up before a holder is revoked,"
            " and its reply is then lost. This is how OpenClaw lost messages."
        )
    if settings.durability == "flush":
        warnings.append(
            "durability = flush: appends are acknowledged before they reach the disk;"
            " a machine crash can lose acknowledged records."
        )
    if settings.max_record_bytes > settings.max_frame_bytes:
        warnings.append(
            f"max_record_bytes ({settings.max_record_bytes}) exceeds max_frame_bytes"
            f" ({settings.max_frame_bytes}): such a record can never arrive over the wire."
        )
    if settings.cluster_key_file is not None:
        warnings.append(
            f"cluster_key_file {settings.cluster_key_file}: every thespian frame is"
            " authenticated with it (HMAC-SHA256), so only holders of the key can make this"
            " service act; frames are not encrypted: whoever can watch the network reads them"
            " (transcript records included)."
        )
    elif settings.trusted_network:
        warnings.append(
            "trusted_network = true without cluster_key_file: thespian's frames are not"
            " authenticated and its ports unpickle whatever arrives; anyone who reaches them"
            " (every local user, and the network beyond loopback) can run code here."
        )
    elif settings.admin_port is not None and settings.leader is None:
        warnings.append(
            "admin_port is fixed but cluster_key_file is unset: this service authenticates its"
            " frames with a secret of its own, so no convention member can join it."
        )
    if settings.metrics_listen is not None:
        host, _ = parse_metrics_listen(settings.metrics_listen)
        if not _is_loopback(host):
            warnings.append(
                f"metrics_listen {settings.metrics_listen} is reachable beyond this machine:"
                " the metrics endpoint has no authentication (it shows counts, never paths)."
            )
    if settings.token_file is not None:
        mode = os.stat(settings.token_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(
                f"token_file {settings.token_file} is accessible to other users"
                f" (mode {stat.S_IMODE(mode):04o}); chmod 600 it."
            )
    for warning in warnings:
        log.debug("config warning: %s", warning)
    return warnings
