"""gpud.netcheck against real netlink, in network namespaces this test creates ("gn-" prefix).

Each namespace pair is joined by a veth pair; addresses are in 10.77.0.0/16 and exist only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpud.config import Config, NodeConfig
from gpud.context import Member, NodeContext
from gpud.errors import GpudError
from gpud.netcheck import (
    NetCheck,
    NetworkStatus,
    check_now,
    interface_for,
    read_host_network,
    resolve_advertise,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Pair:
    """Two namespaces, ``a`` and ``b``, joined by veth ``va`` (in a) <-> ``vb`` (in b)."""

    def __init__(self, tag: str) -> None:
        suffix = f"{os.getpid()}-{tag}"
        self.a = f"gn-a-{suffix}"
        self.b = f"gn-b-{suffix}"

    def up(self) -> None:
        ip("netns", "add", self.a)
        ip("netns", "add", self.b)
        ip("-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", self.b)
        for ns, dev in ((self.a, "va"), (self.b, "vb")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def a_ip(self, *args: str) -> None:
        ip("-n", self.a, *args)

    def b_ip(self, *args: str) -> None:
        ip("-n", self.b, *args)


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(request.node.name[-12:].strip("[]_").replace("_", "")[:10])
    try:
        p.up()
        yield p
    finally:
        p.down()


def config(**node: str) -> Config:
    return Config(node=NodeConfig(name="n-a", **node))


def test_resolve_with_default_route_picks_the_default_interface(pair: Pair) -> None:
    pair.a_ip("link", "add", "vx", "type", "veth", "peer", "name", "vy")
    pair.a_ip("link", "set", "vx", "up")
    pair.a_ip("addr", "add", "10.77.1.1/24", "dev", "vx")
    pair.a_ip("addr", "add", "10.77.2.1/24", "dev", "va")
    pair.a_ip("route", "add", "default", "via", "10.77.2.254", "dev", "va")
    assert resolve_advertise(config(), pair.a) == ("10.77.2.1", "va")
    # A configured interface wins over the default route.
    assert resolve_advertise(config(interface="vx"), pair.a) == ("10.77.1.1", "vx")
    with pytest.raises(GpudError, match="no interface named 'nope'"):
        resolve_advertise(config(interface="nope"), pair.a)
    # A fixed address that no interface holds is returned with no interface (NAT).
    assert resolve_advertise(config(advertise="203.0.113.7"), pair.a) == ("203.0.113.7", "")
    assert interface_for("10.77.1.1", pair.a) == "vx"
    assert interface_for("10.77.9.9", pair.a) is None


def test_resolve_without_default_route(pair: Pair) -> None:
    pair.a_ip("addr", "add", "10.77.3.1/24", "dev", "va")
    assert resolve_advertise(config(), pair.a) == ("10.77.3.1", "va")
    pair.a_ip("addr", "add", "10.77.4.1/24", "dev", "va")
    with pytest.raises(GpudError, match=r"no default route and several addresses.*node.advertise"):
        resolve_advertise(config(), pair.a)
    with pytest.raises(GpudError, match="no default route and no global address"):
        resolve_advertise(config(), pair.b)


async def test_routes_to_peers_across_veth_with_mtu_and_source_mismatch(pair: Pair) -> None:
    pair.a_ip("link", "set", "va", "mtu", "9000")
    pair.a_ip("addr", "add", "10.77.10.1/24", "dev", "va")
    pair.a_ip("addr", "add", "10.77.12.1/24", "dev", "va")
    pair.b_ip("link", "set", "vb", "mtu", "9000")
    pair.b_ip("addr", "add", "10.77.10.2/24", "dev", "vb")
    pair.b_ip("addr", "add", "10.77.11.2/32", "dev", "vb")
    pair.b_ip("addr", "add", "10.77.13.2/32", "dev", "vb")
    pair.b_ip("addr", "add", "10.77.14.2/32", "dev", "vb")
    # One peer behind a route with a smaller MTU, one reached from another source address.
    pair.a_ip("route", "add", "10.77.11.0/24", "via", "10.77.10.2", "dev", "va", "mtu", "1400")
    pair.a_ip("route", "add", "10.77.13.0/24", "dev", "va", "src", "10.77.12.1")
    pair.a_ip("route", "add", "10.77.14.0/24", "via", "10.77.10.2", "dev", "va")

    ctx = NodeContext(config(advertise="10.77.10.1"), "10.77.10.1")
    peers = {
        "b1": "10.77.10.2",
        "b2": "10.77.11.2",
        "b3": "10.77.13.2",
        "b4": "10.77.14.2",
        "gone": "10.99.0.1",
    }
    ctx.set_members(
        {
            name: Member(name=name, addr=addr, port=7946, status="alive")
            for name, addr in [*peers.items(), ("n-a", "10.77.10.1")]
        }
    )
    status = await check_now(ctx, pair.a)
    rows = {r.peer: r for r in status.routes}
    assert set(rows) == set(peers)
    assert status.address_is_local and status.interface == "va" and status.mtu == 9000
    assert (rows["b1"].iface, rows["b1"].src, rows["b1"].mtu) == ("va", "10.77.10.1", 9000)
    assert rows["b1"].warnings == [] and rows["b4"].warnings == []
    assert rows["b4"].gateway == "10.77.10.2"
    assert (rows["b2"].mtu, rows["b2"].gateway) == (1400, "10.77.10.2")
    assert len(rows["b2"].warnings) == 1 and "is 1400 on va, but 9000" in rows["b2"].warnings[0]
    assert rows["b3"].src == "10.77.12.1"
    assert ["leaves from 10.77.12.1" in w for w in rows["b3"].warnings] == [True]
    assert rows["gone"].warnings == ["no route to peer gone (10.99.0.1): Network is unreachable"]
    assert sum(p.severity == "warning" for p in status.problems) == 3


async def wait_for_call(calls: asyncio.Queue[tuple[str | None, str | None]]):
    return await asyncio.wait_for(calls.get(), timeout=10)


@contextlib.asynccontextmanager
async def running(check: NetCheck):
    task = asyncio.create_task(check.run())
    try:
        await asyncio.wait_for(check.checked.wait(), timeout=10)
        yield task
    finally:
        task.cancel()
        # A clean stop: the task ends promptly on cancellation, with no other error.
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)


async def test_watch_auto_reports_removal_then_new_address(pair: Pair) -> None:
    pair.a_ip("addr", "add", "10.77.20.1/24", "dev", "va")
    host = await read_host_network(pair.a)
    assert host.link("va") is not None
    ctx = NodeContext(config(), "10.77.20.1")
    calls: asyncio.Queue[tuple[str | None, str | None]] = asyncio.Queue()

    async def on_change(old: str | None, new: str | None) -> None:
        calls.put_nowait((old, new))

    check = NetCheck(ctx, on_change, refresh_s=60, netns=pair.a)
    async with running(check):
        status = check.status()
        assert status.address_is_local and status.interface == "va" and status.problems == []
        assert status.chosen_by == "only-address"

        pair.a_ip("addr", "del", "10.77.20.1/24", "dev", "va")
        assert await wait_for_call(calls) == ("10.77.20.1", None)
        status = check.status()
        assert status.address_is_local is False
        assert [(p.severity, p.message) for p in status.problems] == [
            ("critical", "advertised address 10.77.20.1 was removed from va")
        ]

        pair.a_ip("addr", "add", "10.77.20.7/24", "dev", "va")
        assert await wait_for_call(calls) == ("10.77.20.1", "10.77.20.7")
        status = check.status()
        assert (status.advertise, status.address_is_local, status.problems) == (
            "10.77.20.7",
            True,
            [],
        )

        pair.a_ip("link", "set", "va", "down")
        for _ in range(100):
            if check.status().problems:
                break
            await asyncio.sleep(0.05)
        assert [p.message for p in check.status().problems] == [
            "interface va holding the advertised address is down"
        ]
        assert calls.empty()


async def test_watch_fixed_address_removal_and_return_and_member_refresh(pair: Pair) -> None:
    pair.a_ip("addr", "add", "10.77.30.1/24", "dev", "va")
    pair.b_ip("addr", "add", "10.77.30.2/24", "dev", "vb")
    ctx = NodeContext(config(advertise="10.77.30.1"), "10.77.30.1")
    calls: asyncio.Queue[tuple[str | None, str | None]] = asyncio.Queue()

    async def on_change(old: str | None, new: str | None) -> None:
        calls.put_nowait((old, new))

    check = NetCheck(ctx, on_change, refresh_s=60, netns=pair.a)
    async with running(check):
        assert check.status().routes == []
        check.checked.clear()
        ctx.set_members({"b": Member(name="b", addr="10.77.30.2", port=7946, status="alive")})
        await asyncio.wait_for(check.checked.wait(), timeout=10)
        [row] = check.status().routes
        assert (row.peer, row.iface, row.src, row.mtu) == ("b", "va", "10.77.30.1", 1500)

        pair.a_ip("addr", "add", "10.77.30.5/24", "dev", "va")
        pair.a_ip("addr", "del", "10.77.30.1/24", "dev", "va")
        # Fixed mode never switches to another address.
        assert await wait_for_call(calls) == ("10.77.30.1", None)
        assert check.status().advertise == "10.77.30.1"
        pair.a_ip("addr", "add", "10.77.30.1/24", "dev", "va")
        assert await wait_for_call(calls) == ("10.77.30.1", "10.77.30.1")
        assert check.status().problems == []

        app = web.Application()
        app.add_routes(check.routes())
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/network")
            assert response.status == 200
            body = msgspec.json.decode(await response.read(), type=NetworkStatus)
        # A late netlink event may re-run the check in between; only checked_at would differ.
        unstamped = msgspec.structs.replace(check.status(), checked_at=body.checked_at)
        assert body == unstamped


async def test_resolve_and_interface_for_work_inside_a_running_event_loop(pair: Pair) -> None:
    # The agent calls these from its event loop; pyroute2's sync API cannot run there.
    pair.a_ip("addr", "add", "10.77.40.1/24", "dev", "va")
    assert resolve_advertise(config(), pair.a) == ("10.77.40.1", "va")
    assert interface_for("10.77.40.1", pair.a) == "va"
