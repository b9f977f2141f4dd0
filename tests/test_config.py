"""Settings: precedence, refusals that name their key, and warnings about risky combinations."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from sessionlane.system.config import (
    ConfigError,
    Settings,
    load_settings,
    normalize_listen,
    parse_listen,
    read_token,
)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sessionlane.toml"
    path.write_text(text)
    return path


def write_token(tmp_path: Path, token: str = "s3cret-0123456789\n", mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(mode)
    return path


def test_defaults_load_with_no_file_no_environment_and_no_warnings() -> None:
    settings, warnings = load_settings(env={})

    assert settings == Settings()
    assert settings.listen == "tcp://127.0.0.1:7420"
    assert settings.max_hold_ms == 300_000 and settings.wait_timeout_ms == 600_000
    assert settings.durability == "fsync" and settings.suffixes == [".jsonl"]
    assert settings.admin_port is None and settings.trusted_network is False
    assert warnings == []


def test_environment_beats_the_file_and_flags_beat_the_environment(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "max_hold_ms = 1000\naging_ms = 2000\nidle_ms = 3000\n")
    env = {"SESSIONLANE_AGING_MS": "20000", "SESSIONLANE_IDLE_MS": "30000"}

    settings, _ = load_settings(config, env=env, overrides={"idle_ms": 300_000, "aging_ms": None})

    assert settings.max_hold_ms == 1000, "from the file"
    assert settings.aging_ms == 20_000, "the environment wins; a None flag is not given"
    assert settings.idle_ms == 300_000, "the flag wins"


def test_environment_values_are_parsed_to_the_keys_types(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    env = {
        "SESSIONLANE_ROOTS": f"{a}{os.pathsep}{b}",
        "SESSIONLANE_SUFFIXES": '[".jsonl", ".ndjson"]',
        "SESSIONLANE_LEGACY_LOCK": "yes",
        "SESSIONLANE_TRUSTED_NETWORK": "0",
        "SESSIONLANE_ADMIN_PORT": "1901",
        "SESSIONLANE_TOKEN_FILE": "",
        "SESSIONLANE_LOG_LEVEL": "debug",
    }

    settings, _ = load_settings(env=env)

    assert settings.roots == [os.path.realpath(a), os.path.realpath(b)]
    assert settings.suffixes == [".jsonl", ".ndjson"]
    assert settings.legacy_lock is True and settings.trusted_network is False
    assert settings.admin_port == 1901 and settings.token_file is None
    assert settings.log_level == "DEBUG"


def test_config_file_named_by_the_environment_is_read(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "max_queue = 7\n")

    settings, _ = load_settings(env={"SESSIONLANE_CONFIG": str(config)})

    assert settings.max_queue == 7


def test_roots_are_canonicalised_and_relative_ones_follow_the_config_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = write_toml(tmp_path, 'roots = ["link", "real/../real"]\n')

    settings, _ = load_settings(config, env={})

    assert settings.roots == [os.path.realpath(tmp_path / "real")], "one root, deduplicated"


@pytest.mark.parametrize(
    ("env", "key", "fragment"),
    [
        ({"SESSIONLANE_MAX_HOLD_MS": "-5"}, "max_hold_ms", "must be > 0 (got -5)"),
        ({"SESSIONLANE_MAX_QUEUE": "0"}, "max_queue", "must be > 0 (got 0)"),
        ({"SESSIONLANE_AGING_MS": "soon"}, "aging_ms", "expected an integer"),
        ({"SESSIONLANE_LEGACY_LOCK": "maybe"}, "legacy_lock", "true/false"),
        ({"SESSIONLANE_DURABILITY": "sometimes"}, "durability", "'fsync' or 'flush'"),
        ({"SESSIONLANE_ROOTS": "/no/such/dir"}, "roots", "not an existing directory"),
        ({"SESSIONLANE_LISTEN": "http://127.0.0.1:80"}, "listen", "tcp://HOST:PORT"),
        ({"SESSIONLANE_LISTEN": "unix://relative.sock"}, "listen", "absolute"),
        ({"SESSIONLANE_ADMIN_PORT": "70000"}, "admin_port", "1..65535"),
        ({"SESSIONLANE_SUFFIXES": "jsonl"}, "suffixes", "'.jsonl'"),
        ({"SESSIONLANE_LOG_LEVEL": "LOUD"}, "log_level", "one of"),
        ({"SESSIONLANE_TOKEN_FILE": "/no/such/token"}, "token_file", "cannot read"),
    ],
)
def test_an_invalid_value_is_refused_with_a_message_naming_its_key(
    env: dict[str, str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env=env)

    assert refused.value.key == key
    assert fragment in refused.value.message
    assert str(refused.value).startswith(f"config key {key}: ")
    assert isinstance(refused.value, ValueError)


def test_the_refusal_says_where_the_bad_value_came_from(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "max_hold_ms = -5\n")

    with pytest.raises(ConfigError) as refused:
        load_settings(config, env={})

    assert str(refused.value) == f"config key max_hold_ms: must be > 0 (got -5) [in {config}]"


def test_a_value_of_the_wrong_type_in_the_file_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'max_queue = "256"\nlegacy_lock = 1\n')

    with pytest.raises(ConfigError) as refused:
        load_settings(config, env={})

    assert refused.value.key in ("max_queue", "legacy_lock")


def test_an_unknown_key_in_the_file_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "max_hold = 1000\n")

    with pytest.raises(ConfigError, match="did you mean max_hold_ms") as refused:
        load_settings(config, env={})

    assert refused.value.key == "max_hold"


def test_an_unknown_sessionlane_environment_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="SESSIONLANE_WAIT_TIMEOUT") as refused:
        load_settings(env={"SESSIONLANE_WAIT_TIMEOUT": "5"})

    assert refused.value.key == "wait_timeout"


def test_non_config_sessionlane_variables_and_other_variables_are_ignored() -> None:
    settings, _ = load_settings(env={"SESSIONLANE_TEST_TAG": "x", "MAX_HOLD_MS": "-1"})

    assert settings == Settings()


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides={"listen_addr": "tcp://127.0.0.1:1"})

    assert refused.value.key == "listen_addr"


def test_a_missing_or_malformed_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as missing:
        load_settings(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML") as malformed:
        load_settings(write_toml(tmp_path, "max_hold_ms = = 1\n"), env={})

    assert missing.value.key == malformed.value.key == "config_file"


def test_a_wait_timeout_shorter_than_the_max_hold_is_warned_about_plainly() -> None:
    _, warnings = load_settings(env={}, overrides={"wait_timeout_ms": 1000, "max_hold_ms": 5000})

    assert len(warnings) == 1
    assert "a waiter can give up before a holder is revoked" in warnings[0]
    assert "OpenClaw lost messages" in warnings[0]


def test_flush_durability_is_warned_about() -> None:
    _, warnings = load_settings(env={"SESSIONLANE_DURABILITY": "flush"})

    assert any("durability = flush" in w for w in warnings)


def test_a_tcp_listen_beyond_loopback_without_a_token_is_refused() -> None:
    for address in ("tcp://0.0.0.0:7420", "tcp://192.0.2.10:7420", "tcp://example.org:7420"):
        with pytest.raises(ConfigError, match="set token_file") as refused:
            load_settings(env={}, overrides={"listen": address})
        assert refused.value.key == "listen"


def test_a_tcp_listen_beyond_loopback_is_accepted_with_a_readable_token(tmp_path: Path) -> None:
    token = write_token(tmp_path)

    settings, warnings = load_settings(
        env={"SESSIONLANE_TOKEN_FILE": str(token)}, overrides={"listen": "tcp://0.0.0.0:7420"}
    )

    assert settings.listen == "tcp://0.0.0.0:7420"
    assert read_token(settings) == "s3cret-0123456789"
    assert warnings == []


def test_loopback_and_unix_listens_need_no_token() -> None:
    for address in ("tcp://127.0.0.1:1", "tcp://127.8.9.10:1", "tcp://[::1]:1", "unix:///tmp/s"):
        settings, _ = load_settings(env={}, overrides={"listen": address})
        assert settings.listen == address
    assert read_token(Settings()) is None


@pytest.mark.parametrize(
    ("content", "mode", "why"),
    [
        (" \n", 0o600, "is empty"),
        ("t\n", 0o600, "holds a 1-byte token; at least 16 bytes are needed"),
        ("0123456789abcde\n", 0o600, "holds a 15-byte token; at least 16 bytes are needed"),
        ("0123456789abcdef\n", 0o644, "is accessible to other users (mode 0644)"),
        ("0123456789abcdef\n", 0o640, "is accessible to other users (mode 0640)"),
        ("0123456789abcdef\n", 0o604, "is accessible to other users (mode 0604)"),
    ],
)
def test_a_weak_token_file_is_refused_naming_the_key_and_the_remedy(
    tmp_path: Path, content: str, mode: int, why: str
) -> None:
    token = write_token(tmp_path, content, mode=mode)
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"SESSIONLANE_TOKEN_FILE": str(token)})
    assert refused.value.key == "token_file"
    assert why in refused.value.message
    assert "chmod 600" in refused.value.message or "openssl rand" in refused.value.message


def test_a_private_token_of_16_bytes_is_accepted_without_a_warning(tmp_path: Path) -> None:
    token = write_token(tmp_path, "0123456789abcdef\n")
    settings, warnings = load_settings(env={"SESSIONLANE_TOKEN_FILE": str(token)})
    assert read_token(settings) == "0123456789abcdef"
    assert not [w for w in warnings if "token" in w]


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("tcp://127.0.0.1:7420", ("tcp", "127.0.0.1", 7420)),
        ("tcp://localhost:0", ("tcp", "localhost", 0)),
        ("tcp://[::1]:9", ("tcp", "::1", 9)),
        ("127.0.0.1:7420", ("tcp", "127.0.0.1", 7420)),
        ("[::1]:7421", ("tcp", "::1", 7421)),
        ("unix:///run/sessionlane.sock", ("unix", "/run/sessionlane.sock")),
    ],
)
def test_listen_addresses_parse_into_their_parts(listen: str, parsed: tuple[object, ...]) -> None:
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize(
    "listen",
    [
        "7420",
        "::1:7420",
        "tcp://127.0.0.1",
        "tcp://:7420",
        "tcp://::1:7420",
        "tcp://h:99999",
        "http://h:80",
        "tcp://h:80/x",
        "unix:relative.sock",
    ],
)
def test_malformed_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_listen(listen)

    assert refused.value.key == "listen"


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("127.0.0.1:7421", "tcp://127.0.0.1:7421"),
        ("tcp://127.0.0.1:7421", "tcp://127.0.0.1:7421"),
        ("[::1]:7421", "tcp://[::1]:7421"),
        ("unix:///run/sl.sock", "unix:///run/sl.sock"),
    ],
)
def test_every_spelling_of_a_listen_address_is_stored_in_its_canonical_form(
    spelling: str, canonical: str
) -> None:
    assert normalize_listen(spelling) == canonical
    settings, _ = load_settings(None, env={}, overrides={"listen": spelling})
    assert settings.listen == canonical


def test_a_leader_is_taken_as_host_port_or_tcp_host_port_and_stored_as_host_port() -> None:
    for spelling in ("127.0.0.1:7500", "tcp://127.0.0.1:7500"):
        overrides = {"leader": spelling, "admin_port": 7501, "trusted_network": True}
        settings, _ = load_settings(None, env={}, overrides=overrides)
        assert settings.leader == "127.0.0.1:7500"


def test_settings_are_frozen_and_config_errors_survive_pickling() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.max_queue = 1  # type: ignore[misc]

    error = pickle.loads(pickle.dumps(ConfigError("max_queue", "must be > 0 (got 0)")))
    assert (error.key, error.message) == ("max_queue", "must be > 0 (got 0)")


def test_a_token_too_long_for_a_hello_is_refused_naming_the_key(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 4000 + "\n")
    token.chmod(0o600)
    with pytest.raises(ConfigError, match="token_file") as refused:
        load_settings(None, env={}, overrides={"token_file": str(token)})
    assert "at most 1024 bytes" in str(refused.value)
