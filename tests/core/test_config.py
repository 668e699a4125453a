"""Config decoding: defaults, strictness, and one-line errors that name the field."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import config, config_reload, hostport
from gpud.errors import ConfigError


def test_empty_file_gives_defaults() -> None:
    cfg = config.parse("")
    # Not serf's own defaults (7946 is also Docker Swarm's, 7373 serf's RPC): a stand-alone
    # serf on the same host must not collide with gpud's.
    assert (cfg.serf.bind_port, cfg.serf.rpc_port, cfg.peer.port) == (7951, 7374, 7948)
    assert cfg.serf.binary == ""
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
        ('[ports]\nblock_size = "big"', 'ports.block_size = "big": Expected `int`'),
        ("[ports]\nblock_size = 2", "ports.block_size"),
        ("[nodes]\nname = 'x'", "nodes: unknown key; did you mean `node`?"),
        ("[node]\nnmae = 'x'", "node.nmae: unknown key; did you mean `node.name`?"),
        ('[node]\nadvertise = "eth0"', "node.advertise: 'eth0' is neither \"auto\" nor an IP"),
        ("[serf]\nbind_port = 70000", "serf.bind_port"),
        ('[serf]\nretry_join = ["not_a_host"]', "serf.retry_join: 'not_a_host'"),
        ('[serf]\nretry_join = ["gpu-01-:7951"]', "serf.retry_join: 'gpu-01-:7951'"),
        ('[serf]\nretry_join = ["a..b"]', "serf.retry_join: 'a..b'"),
        (f'[serf]\nretry_join = ["{"a" * 64}.example"]', "serf.retry_join"),
        ('[ray]\nhead = "always"', 'ray.head = "always": not one of "auto", "prefer", "never"'),
        ("[ports]\nrange_start = 30000\nrange_end = 30010", "ports.block_size = 400: larger"),
        (
            "[ports]\nrange_start = 30000\nrange_end = 20000",
            "ports.range_start = 30000 is greater than ports.range_end = 20000",
        ),
        ("[ports]\nrange_start = 30000\nrange_end = 30000", "ports.range_start = 30000 equals"),
        ("[peer]\nport = 7951", "peer.port = 7951: already serf.bind_port"),
        ("[peer]\nport = 20001", "peer.port = 20001: inside the ports range 20000-32000"),
        ("x = ", "not valid TOML"),
        (b"[node]\nname = '\xff'", "not UTF-8"),
        ('[serf]\nretry_join = ["10.0.0.1:99999"]', "serf.retry_join: '10.0.0.1:99999'"),
        ('[serf]\nretry_join = ["10.0.0.1:-1"]', "serf.retry_join: '10.0.0.1:-1'"),
        ('[serf]\nretry_join = ["10.0.0.1:0"]', "serf.retry_join"),
        ("[health]\nfull_mesh_max = 1000000000000000000000000000000", "health.full_mesh_max"),
        ('[node]\nname = "gpu 01"', "node.name: 'gpu 01' contains ' '"),
        ('[node]\nname = "a/b"', "node.name: 'a/b' contains '/'"),
        ('[node]\nname = "a\\nb"', "node.name: 'a\\nb' contains '\\n'"),
        (f'[node]\nname = "{"n" * 129}"', "node.name: longer than 128"),
        (f'[api]\nsocket = "/tmp/{"s" * 103}"', "api.socket: socket path"),
        (f'[paths]\nruntime_dir = "/tmp/{"r" * 100}"', "paths.runtime_dir: socket path"),
        (
            '[api]\nsocket = "/proc/self/gpud.sock"',
            "api.socket: socket path '/proc/self/gpud.sock' is under /proc",
        ),
    ],
)
def test_bad_config_names_the_field(text: str | bytes, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="gpud.toml")
    message = str(info.value)
    assert message.startswith("gpud.toml: ")
    assert needle in message
    assert "\n" not in message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "nope.toml"))
    assert config.load(str(tmp_path / "nope.toml"), missing_ok=True).serf.rpc_port == 7374


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


def test_good_edge_values_pass() -> None:
    cfg = config.parse(
        f'''
        [node]
        name = "{"n" * 128}"
        [serf]
        retry_join = ["10.0.0.1:65535", "10.0.0.2", "[fd00::1]:7951", "fd00::2", "gpu-02",
                      "gpu-03.cluster.example.:7951", "2gpu.example"]
        [api]
        socket = "/tmp/{"s" * 102}"
        '''
    )
    assert len(cfg.socket_path) == 107 and hostport.split_host_port("fd00::2") == ("fd00::2", None)


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("state_file", "paths.state_dir: "),
        ("key_missing", "cluster.key_file: cannot read"),
        ("key_not_base64", "not base64"),
        ("key_short", "key is 16 bytes, expected 32"),
        ("key_binary", "not base64"),
        ("key_dir", "cluster.key_file: cannot read"),
        ("socket_is_file", "api.socket: "),
    ],
)
def test_host_problems_fail_check_config_and_agent_with_exit_2(
    tmp_path: Path, setup: str, needle: str
) -> None:
    """What only the host can tell is checked by --check-config and by the agent before it
    starts: one line naming the field, exit 2, and nothing on disk is touched."""
    state = tmp_path / "state"
    key = tmp_path / "cluster.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    sock = tmp_path / "gpud.sock"
    if setup == "state_file":
        state.write_text("not a directory")
    elif setup == "key_missing":
        key.unlink()
    elif setup == "key_not_base64":
        key.write_text("hunter2!\n")
    elif setup == "key_short":
        key.write_text(base64.b64encode(os.urandom(16)).decode())
    elif setup == "key_binary":
        key.write_bytes(b"\xff\xfe" * 20)
    elif setup == "key_dir":
        key.unlink()
        key.mkdir()
    elif setup == "socket_is_file":
        sock.write_text("precious")
    cfg = tmp_path / "gpud.toml"
    cfg.write_text(
        f'''
        [cluster]
        key_file = "{key}"
        [api]
        socket = "{sock}"
        [paths]
        state_dir = "{state}"
        [ray]
        enabled = false
        '''
    )
    for argv in (["--check-config"], []):
        result = _gpud("agent", "--config", str(cfg), *argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    if setup == "socket_is_file":
        assert sock.read_text() == "precious"


def test_stale_socket_removal_never_deletes_a_regular_file(tmp_path: Path) -> None:
    from gpud.api import _remove_stale_socket
    from gpud.errors import GpudError

    precious = tmp_path / "precious"
    precious.write_text("data")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path in (precious, link):
        with pytest.raises(GpudError, match="is not a socket; not removing it"):
            _remove_stale_socket(path)
    assert precious.read_text() == "data" and link.is_symlink()
    # A socket nobody answers on (a crashed gpud's) is removed.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    _remove_stale_socket(stale)
    assert not stale.exists()


def test_client_commands_without_daemon_exit_3(tmp_path) -> None:
    for command in ("status", "members", "doctor", "ports"):
        result = _gpud(command, "--socket", str(tmp_path / "none.sock"))
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr.startswith("gpud: gpud is not running")
        assert "Traceback" not in result.stderr


_LIVE_CHANGES = {
    "log_level": "debug",
    "health.failures_before_critical": 7,
    "health.interval_s": 0.5,
    "serf.retry_join": ["10.0.0.9"],
    "ray.priority": 5,
}
_RESTART_CHANGES = {
    "serf.bind_port": 7952,
    "peer.port": 7949,
    "ray.head": "never",
    "node.name": "renamed",
    "ports.block_size": 200,
}


def _with(cfg: config.Config, path: str, value: object) -> config.Config:
    section, _, field = path.rpartition(".")
    if not section:
        return msgspec.structs.replace(cfg, **{field: value})
    sub = msgspec.structs.replace(getattr(cfg, section), **{field: value})
    return msgspec.structs.replace(cfg, **{section: sub})


@given(
    live=st.sets(st.sampled_from(sorted(_LIVE_CHANGES))),
    restart=st.sets(st.sampled_from(sorted(_RESTART_CHANGES))),
)
def test_reload_applies_exactly_the_live_fields(live: set[str], restart: set[str]) -> None:
    old = config.parse("")
    new = old
    for path in live:
        new = _with(new, path, _LIVE_CHANGES[path])
    for path in restart:
        new = _with(new, path, _RESTART_CHANGES[path])
    plan = config_reload.reload_plan(old, new)
    assert set(plan.live) == live and set(plan.restart) == restart
    # What runs now: the new live values, the old everything else.
    assert config_reload.changed_fields(old, plan.config) == plan.live
    assert config_reload.changed_fields(plan.config, new) == plan.restart


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
_HOSTNAME = st.lists(_LABEL, min_size=1, max_size=4).filter(
    lambda labels: not labels[-1].isdigit() and len(".".join(labels)) <= 253
)


@given(labels=_HOSTNAME, port=st.integers(1, 65535) | st.none())
def test_retry_join_takes_dns_names_as_serf_does(labels: list[str], port: int | None) -> None:
    """A name per RFC 1123 (serf resolves it at each join), with or without a port."""
    entry = ".".join(labels) + (f":{port}" if port else "")
    assert hostport.is_join_address(entry)
    assert config.parse(f"[serf]\nretry_join = [{entry!r}]").serf.retry_join == [entry]


@given(
    labels=_HOSTNAME,
    bad=st.sampled_from(["_", " ", "/", "@", "é", "\n", "-"]),
    where=st.integers(0, 1),
)
def test_retry_join_refuses_what_is_no_host_name(labels: list[str], bad: str, where: int) -> None:
    label = labels[0]
    # A hyphen is only refused at a label's edge; the other characters anywhere.
    labels[0] = bad + label if where == 0 else label + bad
    entry = ".".join(labels)
    assert not hostport.is_join_address(entry)
    with pytest.raises(ConfigError, match=r"serf\.retry_join"):
        config.validate(
            msgspec.structs.replace(config.Config(), serf=config.SerfConfig(retry_join=[entry]))
        )


@given(ip=st.ip_addresses(), port=st.integers(1, 65535) | st.none())
def test_retry_join_takes_every_ip_address(ip, port: int | None) -> None:  # type: ignore[no-untyped-def]
    host = f"[{ip}]" if ip.version == 6 and port else str(ip)
    assert hostport.is_join_address(host + (f":{port}" if port else ""))
