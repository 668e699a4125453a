"""No outsider can exhaust a node: connection floods against a real gpud agent.

One outsider address floods node 0 with 5,000 idle or half-open connections to its peer API
and, as an unprivileged uid, 500 to its local socket. Meanwhile the local API must answer
within 1 s, node 1 must never judge node 0 critical, and node 0's journal stays a few lines.
Then 32 outsider addresses hold 1,024 slow-body connections (complete header, a body that never
ends): all are closed within the idle timeout and neither node's verdict moves.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from bench.conn_flood import flood, slow_body_flood
from tests.harness.wait import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

PEER_CONNECTIONS = 5000
SOCKET_CONNECTIONS = 500
HOLD_S = 14.0  # longer than the peer API's 10 s idle timeout


def test_flood_from_one_outsider_costs_the_node_nothing(cluster):
    nodes = cluster(2, overrides={"api": {"socket_mode": 0o666}, "log_level": "info"})
    nodes.wait_converged()
    report = flood(nodes, PEER_CONNECTIONS, SOCKET_CONNECTIONS, HOLD_S)
    peer, local = report["peer"], report["local"]
    assert peer["connected"] == PEER_CONNECTIONS, report
    # Over the per-source cap (32) a connection is closed at once; the rest by the idle timeout.
    assert peer["closed_after_1s"] >= PEER_CONNECTIONS - 32, report
    assert peer["closed_at_end"] == PEER_CONNECTIONS, report
    assert local["closed_after_1s"] >= SOCKET_CONNECTIONS - 32, report
    api = report["api"]
    assert api["failures"] == [] and api["requests"] >= 10, report
    assert api["max_ms"] < 1000, report
    assert "critical" not in report["peer_verdicts_on_victim"], report
    assert report["log"]["tracebacks"] == 0, report
    # Rate-limited: a handful of lines per window, not one per connection.
    assert report["log"]["lines"] < 100, report


SLOW_BODY_CONNECTIONS = 1024
SLOW_BODY_SOURCES = 32
PEER_IDLE_TIMEOUT_S = 10.0  # gpud.api.peer_limits
LOCAL_BODY_TIMEOUT_S = 10.0  # gpud.api.local_limits


def _pair_state(observer, victim) -> str | None:
    pairs = observer.api("/v1/status")["health"]["pairs"]
    return next((p["state"] for p in pairs if p["peer"] == victim.name), None)


def test_slow_bodies_from_many_addresses_are_closed_and_blind_nothing(cluster):
    """A complete header and a body that never finishes, 1,024 times from 32 addresses: each
    connection stayed open as long as the attacker liked, peers saw the node critical and it
    concluded it was behind NAT."""
    nodes = cluster(2)
    nodes.wait_converged()
    victim, peer = nodes[0], nodes[1]
    wait_for(lambda: _pair_state(peer, victim) == "passing", 30, what="peer passes victim")
    wait_for(lambda: _pair_state(victim, peer) == "passing", 30, what="victim passes peer")
    doctors: list[subprocess.CompletedProcess[str]] = []

    def sample() -> dict[str, object]:
        health = victim.api("/v1/status")["health"]
        if not doctors:  # once, while the connections are held: doctor asks for dial-backs
            doctors.extend(n.cli("doctor", check=False) for n in (victim, peer))
        return {
            "peer_sees_victim": _pair_state(peer, victim),
            "victim_nat": health["behind_nat"],
            "victim_sees_peer": _pair_state(victim, peer),
        }

    # The local socket's body read has a deadline too (root: not held to the per-uid cap).
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.connect(victim.socket)
    local.sendall(b"POST /v1/ports/leases HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    local_opened = time.monotonic()
    report = slow_body_flood(nodes, SLOW_BODY_CONNECTIONS, SLOW_BODY_SOURCES, 15.0, sample)
    local.settimeout(max(0.1, local_opened + LOCAL_BODY_TIMEOUT_S + 3 - time.monotonic()))
    try:
        assert local.recv(4096) == b""
    except ConnectionResetError:
        pass
    finally:
        local.close()
    assert time.monotonic() - local_opened < LOCAL_BODY_TIMEOUT_S + 2
    assert report["connect_failed"] == 0, report
    # Every one closed by the server, within the idle timeout (over the caps: at once).
    assert report["closed"] == SLOW_BODY_CONNECTIONS and report["still_open"] == 0, report
    assert report["max_open_s"] < PEER_IDLE_TIMEOUT_S, report
    samples = report["samples"]
    assert samples, report
    assert {s["peer_sees_victim"] for s in samples} == {"passing"}, samples
    assert {s["victim_sees_peer"] for s in samples} == {"passing"}, samples
    assert not any(s["victim_nat"] for s in samples), samples
    for doctor in doctors:
        assert "behind_nat" not in doctor.stdout and "BEHIND NAT" not in doctor.stdout, doctor
    assert victim.status()["health"]["behind_nat"] is False
    assert "Traceback" not in victim.log_text()
