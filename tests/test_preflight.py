"""Preflight: every port gpud needs is checked by a real bind, and a conflict names its holder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from gpud.preflight import check, needed_ports, parse_proc_net, summary
from tests.serf_util import node_config

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
