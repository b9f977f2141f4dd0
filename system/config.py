"""Service settings: one frozen model, loaded from defaults, a TOML file, the environment, flags.

Precedence, lowest first: the defaults (``Settings``) < the TOML file < ``SESSIONLANE_<KEY>``
environment variables < overrides (CLI flags; ``None`` means "flag not given"). Every value
is validated once, at load; a bad one raises :class:`ConfigError` naming the key, so a service
never starts half-configured. Risky but legal combinations come back as warnings for the
caller to print.

Environment values are strings: integers are parsed as such, booleans accept
``true/false/1/0/yes/no``, lists are either a JSON array or ``os.pathsep``-separated, and an
empty value for an optional key (``token_file``, ``admin_port``) means "unset". Relative
``roots``, ``token_file`` and ``cluster_key_file`` in the TOML file are relative to the file's
directory; from the environment or flags they are relative to the working directory.

The model and its validation are ``sessionlane.system.settings``'s; the syntax of addresses and
secret files, and ``ConfigError``, are ``sessionlane.system.config_syntax``'s (both re-exported
here).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from sessionlane.system.config_syntax import (
    MAX_TOKEN_BYTES,
    ConfigError,
    Listen,
    format_listen,
    is_loopback,
    normalize_listen,
    parse_leader,
    parse_listen,
    parse_metrics_listen,
    read_cluster_key_file,
    read_token_file,
)
from sessionlane.system.settings import Settings

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


def read_token(settings: Settings) -> str | None:
    """The token clients must prove they know, or ``None`` when ``token_file`` is unset.

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
    return read_cluster_key_file(settings.cluster_key_file)


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
        if not is_loopback(host):
            warnings.append(
                f"metrics_listen {settings.metrics_listen} is reachable beyond this machine:"
                " the metrics endpoint has no authentication (it shows counts, never paths)."
            )
    for warning in warnings:
        log.debug("config warning: %s", warning)
    return warnings
