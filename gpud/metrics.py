"""Prometheus text exposition of the agent's status (pure: status in, text out)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_STATES = ("unknown", "passing", "warning", "critical")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(
    name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        rendered = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
    return lines


def render(status: dict[str, Any]) -> str:
    """``status`` is /v1/status as builtins (msgspec.to_builtins of the agent's status)."""
    members = status["members"]
    health = status["health"]
    ports = status["ports"]
    ray = status["ray"]
    counts: dict[str, int] = {}
    for member in members:
        counts[member["status"]] = counts.get(member["status"], 0) + 1
    lines = ["# gpud " + str(status["node"]["version"])]
    lines += _family("gpud_up", "1 while the agent runs.", [({}, 1)])
    lines += _family(
        "gpud_members",
        "Cluster members by Serf status.",
        [({"status": s}, n) for s, n in sorted(counts.items())],
    )
    lines += _family(
        "gpud_health_state",
        "This node's health verdict (1 for the current state).",
        [({"state": s}, float(health.get("state") == s)) for s in _STATES],
    )
    lines += _family(
        "gpud_behind_nat",
        "1 when this node is behind NAT or port mapping.",
        [({}, float(bool(health.get("behind_nat"))))],
    )
    peers = health.get("peers", [])
    lines += _family(
        "gpud_peer_reachable",
        "1 when the data path to (out) or from (in) a peer passes, 0 when critical.",
        [
            ({"peer": p["peer"], "direction": p["direction"]}, float(p["state"] == "passing"))
            for p in peers
            if p["state"] in ("passing", "critical")
        ],
    )
    lines += _family(
        "gpud_peer_rtt_milliseconds",
        "Round-trip time of the last successful probe to a peer.",
        [
            ({"peer": p["peer"]}, p["rtt_ms"])
            for p in peers
            if p["direction"] == "out" and p["rtt_ms"] is not None
        ],
    )
    lines += _family(
        "gpud_ports_leased", "Ports leased from this node's block.", [({}, ports.get("leased", 0))]
    )
    lines += _family(
        "gpud_ports_free", "Ports still free in this node's block.", [({}, ports.get("free", 0))]
    )
    lines += _family(
        "gpud_ray_head",
        "1 while this node is the Ray head.",
        [({}, float(ray.get("role") == "head"))],
    )
    lines += _family("gpud_ray_term", "Ray head election term.", [({}, ray.get("term", 0))])
    lines += _family("gpud_gpus", "GPUs reported by NVML.", [({}, status["gpus"]["count"])])
    return "\n".join(lines) + "\n"
