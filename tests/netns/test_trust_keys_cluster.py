"""Unkeyed or mis-keyed is loud, against real gpud agents in the namespace harness:

- a host whose cluster.key differs is critical (serf.key_mismatch: it cannot join, its gossip
  cannot be decrypted) and `gpud doctor` exits 1, while its peers warn that a host at its
  address sends gossip they cannot decrypt (serf.undecryptable_gossip);
- an unkeyed node without cluster.insecure shows serf.unencrypted (critical) and never starts
  Ray, its ray section saying why; with cluster.insecure = true it is quiet about it.
"""

from __future__ import annotations

import time
from pathlib import Path

from gpud import secret
from gpud.config import UNENCRYPTED
from gpud.serf.config import undecryptable
from tests.harness.gpud_node import Cluster, GpudNode, problems, wait_for
from tests.harness.ray_cluster import ray_overrides


def test_serf_lines_are_recognised() -> None:
    """The lines serf 0.8/memberlist 0.2 print (copied from a real run)."""
    peer = (
        "    2026/11/23 21:42:56 [ERR] memberlist: failed to receive: No installed keys could "
        "decrypt the message from=10.0.0.13:59198"
    )
    udp = "[ERR] memberlist: Decrypt packet failed: No installed keys could decrypt the message from=[fd00::3]:7946"
    join = "\t* Failed to join 10.0.0.10: No installed keys could decrypt the message"
    assert undecryptable(peer) == ("from", "10.0.0.13")
    assert undecryptable(udp) == ("from", "fd00::3")
    assert undecryptable(join) == ("join", "10.0.0.10")
    assert undecryptable("[INFO] agent: joining: [10.0.0.10:7946] replay: false") is None


def test_a_mis_keyed_host_is_critical_and_its_peers_warn(bare_cluster) -> None:
    c: Cluster = bare_cluster(3)
    good = [c.add_node(host, start=False) for host in c.hosts[:2]]
    odd_host = c.hosts[2]
    odd = GpudNode(
        odd_host, c.workdir / odd_host.name, key=secret.keygen(), join=c._join_list(odd_host)
    )
    c.nodes.append(odd)
    for node in [*good, odd]:
        node.start()
    wait_for(
        lambda: all(len(n.alive_members()) == 2 for n in good),
        60,
        0.5,
        what="the two keyed nodes see each other",
        describe=c.describe,
    )
    [mismatch] = wait_for(
        lambda: problems(odd, "serf.key_mismatch"),
        60,
        0.5,
        what="serf.key_mismatch on the mis-keyed host",
        describe=lambda: odd.log_tail(20),
    )
    assert mismatch["severity"] == "critical"
    assert mismatch["message"].startswith("cannot join ")
    assert "its gossip cannot be decrypted; cluster.key differs" in mismatch["message"]
    assert any(h.addr in mismatch["message"] for h in c.hosts[:2])
    doctor = odd.cli("doctor", check=False)
    assert doctor.returncode == 1 and "cluster.key differs" in doctor.stdout
    for node in good:
        [warn] = wait_for(
            lambda node=node: problems(node, "serf.undecryptable_gossip"),
            60,
            0.5,
            what=f"serf.undecryptable_gossip on {node.name}",
        )
        assert warn["severity"] == "warning"
        assert warn["message"] == f"a host at {odd.addr} sends gossip we cannot decrypt"
        assert not problems(node, "serf.key_mismatch")
    # Serf repeats it every second; gpud's log says it once per address.
    time.sleep(5)
    for node in good:
        text = node.log_text()
        assert "No installed keys could decrypt" not in text
        assert text.count("a host sends gossip we cannot decrypt") == 1, node.log_tail(30)


def test_an_unkeyed_node_is_loud_and_never_runs_ray(bare_cluster, tmp_path: Path) -> None:
    c: Cluster = bare_cluster(2)
    ray = ray_overrides(str(tmp_path / "ray"))
    unkeyed = c.add_node(c.hosts[0], overrides={"cluster": {"key_file": ""}, **ray})
    consenting = c.add_node(c.hosts[1], overrides={"cluster": {"key_file": "", "insecure": True}})
    [critical] = wait_for(
        lambda: problems(unkeyed, "serf.unencrypted"), 30, 0.5, what="serf.unencrypted"
    )
    assert critical["severity"] == "critical" and critical["message"] == UNENCRYPTED
    assert "cluster.insecure = true" in critical["fix"]
    doctor = unkeyed.cli("doctor", check=False)
    assert doctor.returncode == 1 and UNENCRYPTED in doctor.stdout
    assert UNENCRYPTED in unkeyed.status_text()
    # Ray is enabled and installed, yet it never starts: the node says why.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        section = unkeyed.api("/v1/status")["ray"]
        assert section["process"]["target"] is None, section
        time.sleep(1)
    assert not section["eligible"] and UNENCRYPTED in section["not_eligible_reason"]
    # With cluster.insecure = true (a test cluster) there is no such problem.
    assert not problems(consenting, "serf.unencrypted")
