"""The namespace harness itself: connectivity, every fault's documented effect, teardown."""

from __future__ import annotations

import ipaddress
import os
import select
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpud import config as gpud_config
from gpud.process_groups import proc_stat, process_start
from tests.harness import faults
from tests.harness.gpud_node import (
    Cluster,
    GpudNode,
    WaitAbort,
    WaitTimeout,
    merge,
    to_toml,
    wait_for,
)
from tests.harness.netns import NETNS_DIR, STATE_DIR, Host, Network, cleanup_leftovers

MakeNetwork = Callable[..., Network]

# TCP and UDP echo on one port; each reply is "<peer ip>|<payload>" so tests see NAT effects.
ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    port = int(sys.argv[1])
    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, t): self.t = t
        def datagram_received(self, data, addr): self.t.sendto(addr[0].encode() + b"|" + data, addr)
    async def tcp(reader, writer):
        peer = writer.get_extra_info("peername")[0].encode()
        data = await reader.read(1024)
        writer.write(peer + b"|" + data)
        await writer.drain()
        writer.close()
    async def main():
        server = await asyncio.start_server(tcp, "0.0.0.0", port)
        await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=("0.0.0.0", port))
        print("ready", flush=True)
        await server.serve_forever()
    asyncio.run(main())
    """
)

# argv: proto addr port [count]; prints the replies; exit 0 if at least one reply came back.
CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    proto, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if proto == "tcp":
        try:
            with socket.create_connection((addr, port), timeout=1.0) as s:
                s.sendall(b"ping")
                print(s.recv(1024).decode())
        except OSError as exc:
            print(exc)
            sys.exit(1)
    else:
        count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(count):
            s.sendto(b"%d" % i, (addr, port))
            time.sleep(0.002)
        s.settimeout(1.0)
        got = 0
        try:
            while got < count:
                s.recv(1024)
                got += 1
        except socket.timeout:
            pass
        print(got)
        sys.exit(0 if got else 1)
    """
)


def serve(host: Host, port: int) -> subprocess.Popen[str]:
    """Start the echo server in ``host`` and wait (bounded) until it listens."""
    proc = host.popen(
        [sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    assert ready and proc.stdout.readline().strip() == "ready", (
        f"echo server on {host} did not start"
    )
    return proc


def call(
    src: Host, proto: str, addr: str, port: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    return src.run([sys.executable, "-c", CLIENT, proto, addr, str(port), *extra], check=False)


def tcp_ok(src: Host, dst_addr: str, port: int) -> bool:
    return call(src, "tcp", dst_addr, port).returncode == 0


def udp_ok(src: Host, dst_addr: str, port: int) -> bool:
    return call(src, "udp", dst_addr, port).returncode == 0


def tcp_peer_seen(src: Host, dst_addr: str, port: int) -> str:
    """The source address the server saw for our connection."""
    out = call(src, "tcp", dst_addr, port)
    assert out.returncode == 0, out.stdout
    return out.stdout.strip().split("|")[0]


PORT = 8000


@pytest.mark.netns
def test_hosts_get_unique_names_and_addresses_and_reach_each_other(network: MakeNetwork) -> None:
    net1, net2 = network(3), network(2)
    assert net1.id != net2.id
    assert not net1.subnet.overlaps(net2.subnet)
    for net in (net1, net2):
        assert net.subnet.subnet_of(ipaddress.ip_network("10.77.0.0/16"))
        assert len(net.bridge) <= 15 and all(len(h.cable[1]) <= 15 for h in net)
        assert len({h.addr for h in net}) == len(net.hosts)
        assert all(ipaddress.ip_address(h.addr) in net.subnet for h in net)
    a, b, c = net1.hosts
    assert "UP" in a.run(["ip", "-br", "link", "show", "lo"]).stdout
    serve(b, PORT)
    assert tcp_peer_seen(a, b.addr, PORT) == a.addr
    assert udp_ok(c, b.addr, PORT)
    # The two networks are separate L2 segments.
    assert not tcp_ok(net2[0], b.addr, PORT)


@pytest.mark.netns
def test_link_down_cuts_the_host_off_and_link_up_restores_it(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    serve(b, PORT)
    b.link_down()
    assert not tcp_ok(a, b.addr, PORT)
    b.link_up()
    assert wait_for(lambda: tcp_ok(a, b.addr, PORT), 10, 0.2, what="b reachable after link_up")


@pytest.mark.netns
def test_address_changes(network: MakeNetwork) -> None:
    net = network(2)
    a, b = net.hosts
    serve(b, PORT)
    new = str(net.subnet.network_address + 200)
    b.set_addr(new)
    assert b.addr == new
    assert tcp_ok(a, new, PORT)
    assert f"{net.subnet.network_address + 11}/" not in b.run(["ip", "-br", "addr"]).stdout
    b.add_addr(str(net.subnet.network_address + 201))
    assert tcp_ok(a, str(net.subnet.network_address + 201), PORT)
    b.del_addr(str(net.subnet.network_address + 201))
    assert not tcp_ok(a, str(net.subnet.network_address + 201), PORT)


@pytest.mark.netns
def test_partition_drops_both_ways_and_heals(network: MakeNetwork) -> None:
    a, b, c = network(3).hosts
    for h in (a, b, c):
        serve(h, PORT)
    fault = faults.partition(a, b)
    assert not tcp_ok(a, b.addr, PORT)
    assert not tcp_ok(b, a.addr, PORT)
    assert not udp_ok(b, a.addr, PORT)
    assert tcp_ok(a, c.addr, PORT) and tcp_ok(c, b.addr, PORT)
    fault.heal()
    assert tcp_ok(a, b.addr, PORT) and tcp_ok(b, a.addr, PORT)


@pytest.mark.netns
def test_partition_groups(network: MakeNetwork) -> None:
    a, b, c = network(3).hosts
    serve(c, PORT)
    serve(b, PORT)
    with faults.partition_groups([a, b], [c]):
        assert not tcp_ok(a, c.addr, PORT) and not tcp_ok(b, c.addr, PORT)
        assert tcp_ok(a, b.addr, PORT)
    assert tcp_ok(a, c.addr, PORT)


@pytest.mark.netns
def test_one_way_stateful_a_cannot_reach_b_but_b_reaches_a(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    serve(a, PORT)
    serve(b, PORT)
    fault = faults.one_way(a, b)
    assert not tcp_ok(a, b.addr, PORT), "a opened TCP to b through a one-way drop"
    assert not udp_ok(a, b.addr, PORT), "a's UDP reached b"
    assert tcp_ok(b, a.addr, PORT), "b's connection to a must work (a's replies flow)"
    assert udp_ok(b, a.addr, PORT), "a's UDP replies to b must flow"
    fault.heal()
    assert tcp_ok(a, b.addr, PORT)


@pytest.mark.netns
def test_one_way_stateless_drops_every_packet_from_a(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    serve(a, PORT)
    serve(b, PORT)
    with faults.one_way(a, b, stateless=True):
        assert not tcp_ok(a, b.addr, PORT)
        # b's SYN reaches a, but a's SYN-ACK is dropped: the handshake cannot finish.
        assert not tcp_ok(b, a.addr, PORT)
        counters = a.run(["nft", "list", "table", "inet", faults.TABLE]).stdout
        assert "ct direction" not in counters
    assert tcp_ok(b, a.addr, PORT)


@pytest.mark.netns
def test_block_port_blocks_only_that_port_and_not_loopback(network: MakeNetwork) -> None:
    a, b, c = network(3).hosts
    serve(b, PORT)
    serve(b, PORT + 1)
    faults.block_port(b, PORT)
    assert not tcp_ok(a, b.addr, PORT)
    assert tcp_ok(a, b.addr, PORT + 1)
    assert udp_ok(a, b.addr, PORT), "a TCP block must not touch UDP"
    assert tcp_ok(b, "127.0.0.1", PORT), "loopback inside the host is not affected"
    faults.block_port(b, PORT + 1, source=a)
    assert not tcp_ok(a, b.addr, PORT + 1)
    assert tcp_ok(c, b.addr, PORT + 1)
    faults.heal(b)
    assert tcp_ok(a, b.addr, PORT) and tcp_ok(a, b.addr, PORT + 1)
    assert "gh_faults" not in b.run(["nft", "list", "tables"]).stdout


@pytest.mark.netns
def test_heal_removes_only_the_harness_table(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    a.run(["nft", "add", "table", "inet", "someone_else"])
    faults.partition(a, b)
    faults.heal(a, b)
    tables = a.run(["nft", "list", "tables"]).stdout
    assert "someone_else" in tables and faults.TABLE not in tables


@pytest.mark.netns
def test_loss_drops_about_the_given_share(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    serve(b, PORT)
    with faults.loss(b, 100):
        assert not udp_ok(a, b.addr, PORT)
    with faults.loss(b, 0):
        assert call(a, "udp", b.addr, PORT, "50").stdout.strip() == "50"
    with faults.loss(b, 50, direction="in"):
        got = int(call(a, "udp", b.addr, PORT, "400").stdout.strip())
    # Binomial(400, 0.5): mean 200, sd 10; 130..270 is 7 sd either way.
    assert 130 <= got <= 270, got
    with pytest.raises(ValueError):
        faults.loss(b, 101)


@pytest.mark.netns
def test_port_mapped_host_imitates_docker_port_mapping(network: MakeNetwork) -> None:
    a, b = network(2).hosts
    inner = faults.port_mapped_host(b, {18000: PORT})
    assert inner.advertise_addr == b.addr and inner.outer is b
    assert b.addr not in inner.run(["ip", "-br", "addr"]).stdout, (
        "advertised addr must not be local"
    )
    serve(inner, PORT)
    serve(a, PORT)
    # Inbound: DNAT from the outer address; the service sees the real client.
    assert tcp_peer_seen(a, b.addr, 18000) == a.addr
    assert udp_ok(a, b.addr, 18000)
    assert not tcp_ok(a, b.addr, PORT), "only mapped ports are forwarded"
    # Outbound: masqueraded as the outer address.
    assert tcp_peer_seen(inner, a.addr, PORT) == b.addr
    # Faults address the inner host by its advertised (outer) address.
    with faults.partition(a, inner):
        assert not tcp_ok(a, b.addr, 18000)
    inner.link_down()
    assert not tcp_ok(a, b.addr, 18000)
    inner.link_up()
    assert wait_for(lambda: tcp_ok(a, b.addr, 18000), 10, 0.2, what="inner reachable again")


@pytest.mark.netns
def test_teardown_kills_processes_and_removes_everything(network: MakeNetwork) -> None:
    net = network(2)
    a = net[0]
    # A process group with a child, and a grandchild that escapes into its own session (like
    # gpud's serf child): teardown must stop all of them.
    script = "import subprocess,time; subprocess.Popen(['sleep','300'], start_new_session=True); time.sleep(300)"
    leader = a.popen(["sh", "-c", f'sleep 300 & exec {sys.executable} -c "{script}"'])
    inner = faults.port_mapped_host(net[1], [9000])
    inner.popen(["sleep", "300"])
    wait_for(lambda: len(_pids_in(a.netns)) >= 3, 10, 0.1, what="3 processes in a")
    pids = _pids_in(a.netns) + _pids_in(inner.netns)
    names = net.all_netns()
    assert len(names) == 4  # switch, 2 hosts, inner
    net.close()
    net.close()  # idempotent
    assert leader.returncode is not None
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    assert not [n for n in names if (NETNS_DIR / n).exists()]
    assert not (STATE_DIR / f"gh{net.id}.json").exists()


@pytest.mark.netns
def test_teardown_on_exception() -> None:
    with pytest.raises(RuntimeError), Network(2) as net:
        net[0].popen(["sleep", "300"])
        names = net.all_netns()
        raise RuntimeError("boom")
    assert names and not [n for n in names if (NETNS_DIR / n).exists()]


@pytest.mark.netns
def test_cleanup_leftovers_removes_crashed_runs_only(network: MakeNetwork, tmp_path: Path) -> None:
    live = network(1)
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, subprocess; from tests.harness.netns import Network\n"
            "net = Network(1).start(); p = net[0].popen(['sleep', '300'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(net.id, p.pid, flush=True); os._exit(0)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    net_id, sleeper = map(int, crashed.stdout.split())
    assert (NETNS_DIR / f"gh{net_id}-h0").exists() and Path(f"/proc/{sleeper}").exists()
    removed = cleanup_leftovers()
    assert f"gh{net_id}-h0" in removed and f"gh{net_id}-sw" in removed
    assert not (NETNS_DIR / f"gh{net_id}-h0").exists()
    assert wait_for(lambda: not Path(f"/proc/{sleeper}").exists() or _state(sleeper) == "Z", 5, 0.1)
    assert (NETNS_DIR / f"gh{live.id}-h0").exists(), "a live run's namespaces must survive"


def _pids_in(netns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def _state(pid: int) -> str:
    stat = proc_stat(pid)
    return "gone" if stat is None else stat.state


# ---- pure helpers (no namespaces needed) ----


def test_wait_for_returns_the_truthy_value() -> None:
    values = iter([0, None, [], {"ok": 1}])
    assert wait_for(lambda: next(values), 5, 0.01) == {"ok": 1}


def test_wait_for_times_out_with_the_last_value_and_description() -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_for(lambda: [], 0.1, 0.02, what="members", describe=lambda: "node a sees nobody")
    message = str(info.value)
    assert "members" in message and "last: []" in message and "node a sees nobody" in message


def test_wait_for_keeps_exceptions_as_not_yet_but_aborts_on_wait_abort() -> None:
    def flaky() -> bool:
        raise ConnectionRefusedError("no socket")

    with pytest.raises(WaitTimeout, match="ConnectionRefusedError: no socket"):
        wait_for(flaky, 0.1, 0.02)

    calls = []

    def dead() -> bool:
        calls.append(1)
        raise WaitAbort("process exited")

    with pytest.raises(WaitAbort):
        wait_for(dead, 10, 0.01)
    assert len(calls) == 1


def test_merge_is_deep_and_does_not_modify_its_inputs() -> None:
    base: dict[str, Any] = {"serf": {"bind_port": 1, "retry_join": ["x"]}, "log_level": "info"}
    out = merge(base, {"serf": {"bind_port": 2}, "ray": {"enabled": True}})
    assert out == {
        "serf": {"bind_port": 2, "retry_join": ["x"]},
        "log_level": "info",
        "ray": {"enabled": True},
    }
    assert base["serf"]["bind_port"] == 1


def test_to_toml_round_trips() -> None:
    data = {
        "log_level": "debug",
        "node": {"name": 'odd "name"\\', "advertise": "10.77.1.10"},
        "serf": {"retry_join": ["10.77.1.11:7946"], "retry_interval_s": 1.5, "bind_port": 7946},
        "ray": {"enabled": False, "env": {"RAY_x": "1"}},
    }
    assert tomllib.loads(to_toml(data)) == data


def test_generated_node_config_is_valid_for_gpud(tmp_path: Path) -> None:
    host = Host(Network.__new__(Network), "h0", "gh0-h0", "10.77.0.10", "eth0", ("gh0-sw", "gh0v0"))
    node = GpudNode(
        host,
        tmp_path / "h0",
        key="k" * 43 + "=",
        join=["10.77.0.11:7946"],
        overrides={"health": {"interval_s": 0.5}, "ray": {"enabled": True}},
    )
    node.write_config()
    cfg = gpud_config.load(str(node.config_file))
    assert cfg.node.name == "h0" and cfg.node.advertise == "10.77.0.10"
    assert cfg.serf.retry_join == ["10.77.0.11:7946"]
    assert cfg.health.interval_s == 0.5 and cfg.ray.enabled
    assert cfg.socket_path == node.socket and len(node.socket) <= 100
    assert cfg.cluster.key_file == str(node.key_file)
    assert oct(os.stat(node.key_file).st_mode & 0o777) == "0o600"


@pytest.mark.netns
def test_gpud_node_lifecycle_in_a_real_cluster(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    c.wait_converged(timeout=60)
    status = c[0].status()
    assert {"node", "members", "health", "network", "ports", "ray", "gpus"} <= set(status)
    assert {m["name"] for m in status["members"]} == {"h0", "h1", "h2"}
    assert "h1" in c[1].status_text()

    def view(node: GpudNode, name: str) -> str | None:
        return {m["name"]: m["status"] for m in node.members()}.get(name)

    # kill9_serf: only the serf child dies; gpud restarts it and the cluster reconverges.
    n2 = c[2]
    old_serf = n2.kill9_serf()
    assert n2.running()
    wait_for(lambda: n2.serf_pid() not in (None, old_serf), 30, 0.5, what="a new serf child")
    c.wait_converged(timeout=60)
    # kill9: gpud and serf die at once; peers declare the node failed.
    n2.kill9()
    assert not n2.running() and n2.serf_pid() is None
    wait_for(
        lambda: view(c[0], "h2") == "failed", 60, 0.5, what="h2 failed on h0", describe=c.describe
    )
    n2.restart()
    c.wait_converged(timeout=60)
    # terminate: a graceful stop of gpud alone; its serf runs on for the next gpud to adopt,
    # so peers still list the node alive.
    serf = c[1].status()["serf"]["supervisor"]["pid"]
    assert c[1].terminate() == 0
    time.sleep(3)
    assert view(c[0], "h1") == "alive" and process_start(serf) is not None
    assert "starting gpud" in c[1].log_text()
