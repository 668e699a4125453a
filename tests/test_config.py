"""Config decoding: defaults, strictness, and one-line errors that name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpud import config
from gpud.errors import ConfigError


def test_empty_file_gives_defaults() -> None:
    cfg = config.parse("")
    assert cfg.serf.bind_port == 7946
    assert cfg.ports.range_end <= 32768, "default port space must stay below the ephemeral range"
    assert cfg.socket_path == "/run/gpud/gpud.sock"


def test_full_file_round_trip() -> None:
    cfg = config.parse(
        """
        [node]
        name = "gpu-01"
        advertise = "10.77.0.5"
        [serf]
        retry_join = ["10.77.0.6", "10.77.0.7:7946"]
        [api]
        socket = "/tmp/x.sock"
        [ports]
        range_start = 21000
        range_end = 22000
        block_size = 100
        [ray]
        head = "never"
        """
    )
    assert cfg.node_name == "gpu-01"
    assert cfg.serf.retry_join == ["10.77.0.6", "10.77.0.7:7946"]
    assert cfg.socket_path == "/tmp/x.sock"
    assert cfg.ray.head == "never"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[ports]\nblock_size = "big"', "ports.block_size: Expected `int`"),
        ("[ports]\nblock_size = 2", "ports.block_size"),
        ("[nodes]\nname = 'x'", "unknown field `nodes`"),
        ("[node]\nnmae = 'x'", "unknown field `nmae`"),
        ('[node]\nadvertise = "eth0"', "node.advertise: 'eth0' is neither \"auto\" nor an IP"),
        ("[serf]\nbind_port = 70000", "serf.bind_port"),
        ('[serf]\nretry_join = ["not-an-ip"]', "serf.retry_join"),
        ('[ray]\nhead = "always"', "ray.head"),
        ("[ports]\nrange_start = 30000\nrange_end = 30010", "smaller than one block"),
        ("[peer]\nport = 7946", "must all differ"),
        ("[peer]\nport = 20001", "outside the ports range"),
        ("x = ", "not valid TOML"),
    ],
)
def test_bad_config_names_the_field(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="gpud.toml")
    message = str(info.value)
    assert message.startswith("gpud.toml: ")
    assert needle in message
    assert "\n" not in message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "nope.toml"))
    assert config.load(str(tmp_path / "nope.toml"), missing_ok=True).serf.rpc_port == 7373


def test_config_path_precedence(monkeypatch) -> None:
    monkeypatch.setenv("GPUD_CONFIG", "/env.toml")
    assert config.config_path("/flag.toml") == "/flag.toml"
    assert config.config_path(None) == "/env.toml"
    monkeypatch.delenv("GPUD_CONFIG")
    assert config.config_path(None) == config.DEFAULT_PATH


def _gpud(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[node]\nname = "a"\n')
    result = _gpud("agent", "--config", str(good), "--check-config")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[ports]\nblock_size = -1\n")
    result = _gpud("agent", "--config", str(bad), "--check-config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, "one line, no traceback"
    assert "ports.block_size" in result.stderr


def test_bad_cli_arguments_exit_2_without_traceback() -> None:
    for argv in (["frobnicate"], ["status", "--bogus"], []):
        result = _gpud(*argv)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "usage: gpud" in result.stderr


def test_client_commands_without_daemon_exit_3(tmp_path) -> None:
    for command in ("status", "members", "doctor", "ports"):
        result = _gpud(command, "--socket", str(tmp_path / "none.sock"))
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr.startswith("gpud: gpud is not running")
        assert "Traceback" not in result.stderr
