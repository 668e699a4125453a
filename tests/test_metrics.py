"""Prometheus rendering of a status document."""

from __future__ import annotations

from gpud import metrics


def _status(**health: object) -> dict:
    return {
        "node": {"version": "0.1.0"},
        "members": [{"status": "alive"}, {"status": "alive"}, {"status": "failed"}],
        "health": {"state": "warning", "behind_nat": False, "peers": [], **health},
        "ports": {"leased": 7, "free": 393},
        "ray": {"role": "head", "term": 4},
        "gpus": {"count": 8},
    }


def test_families_and_values() -> None:
    peers = [
        {"peer": "b", "direction": "out", "state": "passing", "rtt_ms": 0.5},
        {"peer": "b", "direction": "in", "state": "critical", "rtt_ms": None},
        {"peer": 'we"ird', "direction": "out", "state": "unknown", "rtt_ms": None},
    ]
    lines = metrics.render(_status(peers=peers)).splitlines()
    assert 'gpud_members{status="alive"} 2' in lines
    assert 'gpud_members{status="failed"} 1' in lines
    assert 'gpud_health_state{state="warning"} 1' in lines
    assert 'gpud_health_state{state="passing"} 0' in lines
    assert 'gpud_peer_reachable{peer="b",direction="out"} 1' in lines
    assert 'gpud_peer_reachable{peer="b",direction="in"} 0' in lines
    assert not any('we\\"ird' in line and "reachable{" in line for line in lines), (
        "unknown is not 0"
    )
    assert 'gpud_peer_rtt_milliseconds{peer="b"} 0.5' in lines
    assert "gpud_ports_leased 7" in lines and "gpud_ports_free 393" in lines
    assert "gpud_ray_head 1" in lines and "gpud_ray_term 4" in lines
    assert "gpud_gpus 8" in lines
    for line in lines:
        assert line.startswith("#") or line.startswith("gpud_")


def test_label_values_are_escaped() -> None:
    peers = [{"peer": 'a"b\\c', "direction": "out", "state": "passing", "rtt_ms": 1.0}]
    text = metrics.render(_status(peers=peers))
    assert 'gpud_peer_reachable{peer="a\\"b\\\\c",direction="out"} 1' in text.splitlines()
