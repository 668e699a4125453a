"""One-way reachability with a real firewall: two HealthServices in a private network namespace
(`unshare -n`, loopback only) with an nftables rule dropping n1 -> n2's peer port, as a
firewall on n2 would. Each side must report the direction that fails and name the host to
look at.

The scenario runs as this module's __main__ inside the namespace and prints JSON; the test
reads it. Nothing outside the namespace is touched, and it disappears with the process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest

from gpud import secret

ROUNDS = 4


async def scenario(workdir: Path) -> dict[str, object]:
    from tests.harness.health_loopback import cluster, rounds

    key_file = workdir / "cluster.key"
    key_file.write_text(secret.keygen())
    async with cluster(key_file, 2) as (a, b):
        port_b = b.ctx.config.peer.port
        rule = f"ip saddr 127.77.0.1 ip daddr 127.77.0.2 tcp dport {port_b} drop"
        nft = (
            "add table inet gk_oneway\n"
            "add chain inet gk_oneway input { type filter hook input priority 0; }\n"
            f"add rule inet gk_oneway input {rule}\n"
        )
        proc = await asyncio.create_subprocess_exec("nft", "-f", "-", stdin=subprocess.PIPE)
        await proc.communicate(nft.encode())
        assert proc.returncode == 0, "nft refused the rule"
        await rounds([a, b], ROUNDS)
        doctor_b = await b.service.diagnose()
        return {
            "port_a": a.ctx.config.peer.port,
            "port_b": port_b,
            "a": msgspec.to_builtins(a.service.status()),
            "b": msgspec.to_builtins(b.service.status()),
            "doctor_b": msgspec.to_builtins(doctor_b),
        }


def run_in_namespace() -> dict[str, object]:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nft"):
        pytest.skip("needs root, unshare and nft")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-m", "tests.netns.test_health_oneway"],
        cwd=root,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout)


def test_one_way_firewall_is_reported_from_both_sides():
    result = run_in_namespace()
    port_a, port_b = result["port_a"], result["port_b"]
    a_pair = result["a"]["pairs"][0]
    b_pair = result["b"]["pairs"][0]
    # n1 cannot reach n2's peer port; n2's probes reach n1.
    assert (a_pair["state"], a_pair["kind"]) == ("warning", "out-failing")
    assert a_pair["message"].startswith(
        f"127.77.0.2 reaches us but we cannot reach 127.77.0.2:{port_b} (TCP connect timed out"
    )
    assert a_pair["message"].endswith("— a firewall on 127.77.0.2 or a one-way NAT")
    a_rows = {r["direction"]: r for r in result["a"]["peers"]}
    assert a_rows["out"]["state"] == "critical" and a_rows["in"]["state"] == "passing"
    assert a_rows["in"]["source"] == "inbound probes"
    # n2 reaches n1, and n1's dial-back to n2 fails: look at n2's own firewall.
    assert (b_pair["state"], b_pair["kind"]) == ("warning", "in-failing")
    assert (
        f"we reach 127.77.0.1:{port_a} but 127.77.0.1 cannot reach us at 127.77.0.2:{port_b}"
        in (b_pair["message"])
    )
    assert "n1 dialled back to 127.77.0.2" in b_pair["message"]
    assert "a firewall on this host (127.77.0.2)" in b_pair["message"]
    b_rows = {r["direction"]: r for r in result["b"]["peers"]}
    assert b_rows["out"]["state"] == "passing" and b_rows["in"]["state"] == "critical"
    assert b_rows["in"]["source"] == "dial-back"
    # One peer alone: a one-way firewall, not (yet) evidence of NAT.
    assert not result["a"]["behind_nat"] and not result["b"]["behind_nat"]
    assert result["a"]["state"] == result["b"]["state"] == "warning"
    problems = result["doctor_b"]
    assert [(p["severity"], p["code"]) for p in problems] == [("warning", "health.in-failing")]
    assert f"allow inbound TCP {port_b}" in problems[0]["fix"]


if __name__ == "__main__":
    # Inside `unshare -n`: a fresh namespace whose loopback is down until we raise it.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(scenario(Path(tmp)))))
