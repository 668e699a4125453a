"""Preflight: every port gpud needs is checked by a real bind, and a conflict names its holder."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from gpud.preflight import check, needed_ports, parse_proc_net, read_ephemeral_range, summary
from tests.harness.serf import free_ports, node_config

# Two rows of a real /proc/net/tcp: 127.0.0.1:7373 listening (uid 0), 10.0.0.5:7946 established.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1CCD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1
   1: 0500000A:1F0A 0600000A:A2C4 01 00000000:00000000 00:00000000 00000000   998        0 4242 1
   2: garbage
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:1F0A 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   998        0 777 1
"""


def test_parse_proc_net_reads_address_port_state_uid_inode() -> None:
    listen, established = parse_proc_net(PROC_NET_TCP)
    assert (listen.local, listen.port, listen.state, listen.uid, listen.inode) == (
        "127.0.0.1",
        7373,
        "0A",
        0,
        31337,
    )
    assert (established.local, established.port, established.uid) == ("10.0.0.5", 7946, 998)
    [v6] = parse_proc_net(PROC_NET_TCP6)
    assert (v6.local, v6.port, v6.inode) == ("::", 7946, 777)


def test_needed_ports_cover_gossip_both_protocols_rpc_and_peer(tmp_path: Path) -> None:
    config = node_config(tmp_path, "n1")
    needs = {(n.field, n.proto, n.host) for n in needed_ports(config, "10.0.0.5", True)}
    assert needs == {
        ("serf.bind_port", "tcp", "10.0.0.5"),
        ("serf.bind_port", "udp", "10.0.0.5"),
        ("serf.rpc_port", "tcp", "127.0.0.1"),
        ("peer.port", "tcp", "10.0.0.5"),
    }
    # Behind NAT serf and the peer API bind every address: that is what must be free.
    assert {n.host for n in needed_ports(config, "203.0.113.9", False)} == {
        "0.0.0.0",
        "127.0.0.1",
    }


def test_free_ports_pass_and_held_ports_name_their_holder(tmp_path: Path) -> None:
    config = node_config(tmp_path, "n1")
    assert check(config, "127.0.0.1", True) == []
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket() as peer,
    ):
        udp.bind(("127.0.0.1", config.serf.bind_port))
        peer.bind(("0.0.0.0", config.peer.port))
        peer.listen(1)
        conflicts = check(config, "127.0.0.1", True)
        assert [(c.need.field, c.need.proto) for c in conflicts] == [
            ("serf.bind_port", "udp"),
            ("peer.port", "tcp"),
        ]
        for conflict in conflicts:
            [holder] = conflict.holders
            assert holder.pid == os.getpid() and holder.uid == os.getuid()
            assert f"pid {os.getpid()}" in conflict.describe()
        assert [c.problem().code for c in conflicts] == ["serf.port_conflict", "peer.port_conflict"]
        line = summary(conflicts)
        assert "\n" not in line and f":{config.peer.port}/tcp (peer.port)" in line
    assert check(config, "127.0.0.1", True) == []


def test_agent_with_a_held_port_fails_fast_and_says_why(tmp_path: Path) -> None:
    """The unit must fail, not hang in `activating`: exit non-zero within seconds, STATUS= and
    an error line naming the port and the process holding it."""
    serf_port, rpc_port, peer_port = free_ports(3)
    config = tmp_path / "gpud.toml"
    config.write_text(
        f"""
        [node]
        name = "solo"
        advertise = "127.0.0.1"
        [serf]
        bind_port = {serf_port}
        rpc_port = {rpc_port}
        [peer]
        port = {peer_port}
        [paths]
        state_dir = "{tmp_path / "state"}"
        runtime_dir = "{tmp_path / "run"}"
        [ray]
        enabled = false
        """
    )
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        socket.socket() as squatter,
    ):
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(0)
        squatter.bind(("127.0.0.1", serf_port))
        squatter.listen(1)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "gpud", "agent", "--config", str(config)],
            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock")),
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(notify.recv(4096).decode())
    assert result.returncode != 0 and took < 30, (result.returncode, took)
    where = f"127.0.0.1:{serf_port}/tcp (serf.bind_port) is in use by pid {os.getpid()}"
    [status] = [m for m in messages if m.startswith("STATUS=failed: port conflict")]
    assert where in status and not any(m.startswith("READY=1") for m in messages)
    [line] = [line for line in result.stderr.splitlines() if "port conflict" in line]
    assert "level=error" in line and where in line
    assert not (tmp_path / "state" / "serf" / "serf.json").exists()  # nothing was started


def test_ephemeral_range_is_read_as_the_kernel_writes_it(tmp_path: Path) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    assert read_ephemeral_range(ranges) == (32768, 60999)
    ranges.write_text("garbage\n")
    assert read_ephemeral_range(ranges) is None
    assert read_ephemeral_range(tmp_path / "absent") is None
