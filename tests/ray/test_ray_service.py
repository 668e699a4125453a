"""RayService: Ray missing, and a real-Ray cluster of in-process gpud nodes (loopback)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpud.config import RayConfig
from gpud.process_groups import group_members
from gpud.ray.service import RayServiceSettings
from gpud.ray.supervisor import SupervisorSettings
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.ray_loopback import Nodes
from tests.harness.wait import async_wait_for as wait_for

needs_ray = pytest.mark.skipif(
    shutil.which(RAY_EXECUTABLE) is None, reason="ray not installed in .venv"
)


async def test_ray_missing_gives_a_clear_status(tmp_path: Path) -> None:
    nodes = Nodes(tmp_path, {name: RayConfig(executable="/nonexistent/ray") for name in "abc"})
    nodes.start()
    try:
        a = nodes.services["a"]
        await wait_for(
            lambda: a.status().action == "wait" and a.install is not None, 20, what="a settled"
        )
        status = a.status()
        assert not status.ray_available and not status.eligible
        assert "not found" in (status.not_eligible_reason or "")
        assert "not found" in status.summary
        assert status.process.process.state == "stopped" and status.process.target is None
        assert a.ctx.tags.rv is False and a.ctx.tags.ray == "none"
        assert "no eligible head" in a.election.plan.reason
        # GET /v1/ray serves the same struct as JSON.
        app = web.Application()
        app.add_routes(a.routes())
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get("/v1/ray")
            assert response.status == 200
            body = await response.json()
        assert body["ray_available"] is False and "not found" in body["summary"]
    finally:
        await nodes.stop_all()


@pytest.mark.ray
@needs_ray
@pytest.mark.timeout(280)
async def test_elected_head_runs_ray_and_fails_over(tmp_path: Path) -> None:
    with_ray = RayConfig(executable=RAY_EXECUTABLE, num_cpus=1)
    # c votes but runs no Ray: three voters, so one can die and a majority remains.
    settings = RayServiceSettings(
        supervisor=SupervisorSettings(grace_s=3.0, worker_ports=8), nodes_every_s=2.0
    )
    nodes = Nodes(
        tmp_path,
        {"a": with_ray, "b": with_ray, "c": RayConfig(enabled=False)},
        settings=settings,
    )
    nodes.start()
    pgids: list[int] = []
    try:

        def head_ready() -> str | None:
            for name, service in nodes.services.items():
                if (
                    name not in nodes.down
                    and service.ctx.tags.ray == "head"
                    and service.ctx.tags.gcs
                ):
                    return name
            return None

        await wait_for(lambda: head_ready() is not None, 120, what="a head with GCS ready")
        head = head_ready()
        assert head in ("a", "b")
        worker = "b" if head == "a" else "a"
        term = nodes.services[head].ctx.tags.term

        def two_ray_nodes() -> bool:
            seen = nodes.services[worker].status().ray_nodes.nodes or []
            return sorted(n.name for n in seen) == ["a", "b"]

        await wait_for(two_ray_nodes, 120, what="the GCS reporting both Ray nodes alive")
        status = nodes.services[worker].status()
        assert status.role == "worker" and status.head == head and status.reason is None
        assert status.head_address is not None and "worker of" in status.summary
        assert nodes.services["c"].ctx.tags.ray == "none"

        # kill -9 the head "host": its Ray process group, then its gpud; serf calls it failed.
        head_service = nodes.services[head]
        head_pid = head_service.supervisor.status().process.pid
        assert head_pid is not None
        pgids.append(head_pid)
        os.killpg(head_pid, signal.SIGKILL)
        nodes.down.add(head)
        await nodes.stop(head)
        await wait_for(
            lambda: head_ready() == worker, 120, what="the survivor as head with GCS ready"
        )
        new = nodes.services[worker]
        assert new.ctx.tags.term == term + 1
        new_pid = new.supervisor.status().process.pid
        assert new_pid is not None
        pgids.append(new_pid)

        # The other voter dies too: 1 of 3 alive is no majority, so the head steps down and
        # stops its Ray (its own process group), and announces no head role.
        nodes.down.add("c")
        await nodes.stop("c")
        await wait_for(
            lambda: new.ctx.tags.ray == "none" and new.status().process.process.pid is None,
            60,
            what="the head without a majority to stop Ray",
        )
        assert group_members(new_pid) == []
        status = new.status()
        assert status.action == "step_down" or "no majority" in (status.reason or "")
        assert "majority" in status.summary
    finally:
        await nodes.stop_all()
    await asyncio.sleep(0.5)
    for pgid in pgids:
        assert group_members(pgid) == []
    assert nodes.ports.leases == {}
