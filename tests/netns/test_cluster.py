"""Foundation in the namespace harness: three real gpud + serf hosts converge with decoded tags."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness.gpud_node import Cluster, wait_for


def test_three_hosts_converge_with_decoded_tags(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    c.wait_converged(timeout=60)
    names = {node.name for node in c}
    addrs = {node.name: node.addr for node in c}

    def settled(node) -> dict | None:  # type: ignore[no-untyped-def]
        status = node.status()  # the CLI: gpud status --json
        members = status["members"]
        if {m["name"] for m in members if m["status"] == "alive"} != names:
            return None
        if any(m["tags"] is None or m["tags"]["blk"] < 0 for m in members):
            return None  # blocks are claimed a little after joining
        return status

    for node in c:
        status = wait_for(lambda n=node: settled(n), 60, 0.5, what=f"{node.name} settled")
        sections = {
            "serf",
            "membership",
            "network",
            "health",
            "ports",
            "ray",
            "gpus",
            "deployments",
            "router",
            "metrics",
        }
        assert set(status) == {"node", "members", "summaries", "problems", *sections}
        assert set(status["summaries"]) == sections
        assert status["node"]["name"] == node.name and status["node"]["addr"] == node.addr
        for member in status["members"]:
            assert member["tags_error"] is None
            assert member["addr"] == addrs[member["name"]]
            tags = member["tags"]
            assert tags["v"] == 1 and tags["role"] == "gpud"
            assert tags["pp"] == node.peer_port
            assert tags["gpu"] == 0
            assert tags["ray"] == "none"
        assert status["gpus"]["count"] == 0 and status["gpus"]["nvml"] != "ok"
        assert status["ray"]["state"] == "disabled"

    table = c[0].cli("members").stdout
    for name in names:
        assert name in table
    assert table.count("alive") == 3
