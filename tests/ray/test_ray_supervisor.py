"""RaySupervisor with real Ray on loopback: head + worker on explicit leased ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpud.process_groups import (
    GroupRecord,
    group_members,
    leftover_members,
    process_start,
)
from gpud.ray.probes import GcsNodes, alive_ray_nodes, gcs_healthy, gcs_serving, probe_ray
from gpud.ray.supervisor import (
    RAY_ADDRESS_FILE,
    RAY_CHILD,
    RAY_START_DEFAULTS,
    RayPorts,
    RaySupervisor,
    RayTarget,
    SupervisorSettings,
    gcs_address_of,
    node_registered,
    port_names,
    ray_start_argv,
    ray_start_env,
    temp_dir_for,
)
from gpud.state import StateStore
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.ray_loopback import SimplePorts
from tests.harness.wait import async_wait_for

needs_ray = pytest.mark.skipif(
    shutil.which(RAY_EXECUTABLE) is None, reason="ray not installed in .venv"
)


def test_argv_uses_every_leased_port() -> None:
    ports = RayPorts(
        named={"port": 1, "ray-client-server-port": 2, "node-manager-port": 3},
        min_worker_port=10,
        max_worker_port=20,
    )
    argv = ray_start_argv(
        "ray",
        RayTarget(role="head"),
        ports,
        node_name="n1",
        node_ip="10.0.0.1",
        temp_dir="/tmp/x",
        num_cpus=2,
        num_gpus=1,
    )
    assert argv[:4] == ["ray", "start", "--block", "--head"]
    for flag in (
        "--port=1",
        "--ray-client-server-port=2",
        "--node-manager-port=3",
        "--min-worker-port=10",
        "--max-worker-port=20",
        "--node-ip-address=10.0.0.1",
        "--num-cpus=2",
        "--num-gpus=1",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ):
        assert flag in argv
    worker_ports = RayPorts(
        named={name: 100 + i for i, name in enumerate(port_names("worker", client_server=True))},
        min_worker_port=10,
        max_worker_port=20,
    )
    worker = ray_start_argv(
        "ray",
        RayTarget(role="worker", head_addr="10.0.0.2", gcs_port=5),
        worker_ports,
        node_name="n1",
        node_ip="10.0.0.1",
        temp_dir="/tmp/x",
        num_cpus=None,
        num_gpus=0,
    )
    assert "--address=10.0.0.2:5" in worker and "--head" not in worker
    assert not any(a.startswith(("--include-dashboard", "--port=")) for a in worker)
    assert not any(a.startswith("--num-cpus") for a in worker)
    assert "--object-manager-port=101" in worker
    # The GPUs in the target decide --num-gpus (the supervisor's count is only the default).
    with_gpus = ray_start_argv(
        "ray",
        RayTarget(role="head", gpus=("GPU-a", "GPU-b")),
        ports,
        node_name="n1",
        node_ip="10.0.0.1",
        temp_dir="/tmp/x",
        num_cpus=None,
        num_gpus=8,
    )
    assert "--num-gpus=2" in with_gpus and "--num-gpus=8" not in with_gpus


def test_port_names() -> None:
    head = port_names("head", client_server=True)
    assert head[0] == "port" and "ray-client-server-port" in head
    assert "ray-client-server-port" not in port_names("head", client_server=False)
    worker = port_names("worker", client_server=True)
    assert "port" not in worker and "ray-client-server-port" not in worker
    assert len(set(head)) == len(head) and set(worker) < set(head)


def test_temp_dir_is_short_and_unique() -> None:
    root = "/tmp/gpud-ray"
    long_a = temp_dir_for("/tmp/gpud-ray", "x" * 300 + "a")
    long_b = temp_dir_for("/tmp/gpud-ray", "x" * 300 + "b")
    evil = temp_dir_for("/tmp/gpud-ray", "../../etc")
    assert long_a != long_b
    for path in (long_a, long_b, evil):
        assert path.startswith("/tmp/gpud-ray/") and len(path) <= len("/tmp/gpud-ray/") + 24
        name = path[len("/tmp/gpud-ray/") :]
        assert "/" not in name and name not in (".", "..") and os.path.dirname(path) == root
    assert temp_dir_for("/tmp/gpud-ray", "gpu-node-07") == "/tmp/gpud-ray/gpu-node-07"
    # Ray's longest socket path under it stays below the 107-byte limit.
    sockets = "/session_2026-11-23_13-35-16_414902_4194304/sockets/plasma_store"
    assert len(long_a + sockets) <= 107


async def test_missing_ray_is_reported() -> None:
    install = await probe_ray("/nonexistent/ray")
    assert install.reason is not None and "not found" in install.reason


async def test_unrunnable_ray_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.write_text("#!/bin/sh\necho broken install >&2\nexit 3\n")
    fake.chmod(0o755)
    install = await probe_ray(str(fake))
    assert install.reason is not None
    assert "broken install" in install.reason and "(3)" in install.reason


@pytest.mark.ray
@needs_ray
@pytest.mark.timeout(280)
async def test_head_and_worker_then_head_killed(tmp_path: Path) -> None:
    install = await probe_ray(RAY_EXECUTABLE)
    assert install.reason is None and install.version.startswith("2."), install
    root = f"/tmp/gpud-ray-test-{tmp_path.name[-12:]}"
    ports = SimplePorts(23000, 24000)

    def supervisor(name: str, ip: str) -> RaySupervisor:
        return RaySupervisor(
            executable=RAY_EXECUTABLE,
            node_name=name,
            node_ip=ip,
            ports=ports,
            temp_root=root,
            num_cpus=1,
            settings=SupervisorSettings(worker_ports=8, grace_s=3),
            client_server=install.client,
        )

    head = supervisor("h1", "127.0.0.2")
    worker = supervisor("w1", "127.0.0.3")
    head2 = supervisor("h2", "127.0.0.4")
    tasks = [asyncio.create_task(s.run()) for s in (head, worker, head2)]
    pgids: list[int] = []
    try:
        head.set_target(RayTarget(role="head"))

        async def head_ready() -> bool:
            return head.gcs_ready_port != 0

        await async_wait_for(head_ready, 90, what="head GCS ready")
        gcs = head.gcs_ready_port
        assert head.ray_ports is not None and gcs == head.ray_ports.named["port"]
        assert await gcs_healthy(RAY_EXECUTABLE, "127.0.0.2", gcs)
        worker.set_target(RayTarget(role="worker", head_addr="127.0.0.2", gcs_port=gcs))

        async def two_nodes() -> bool:
            nodes = await alive_ray_nodes(RAY_EXECUTABLE, f"127.0.0.2:{gcs}")
            return sorted(n.name for n in nodes) == ["h1", "w1"]

        await async_wait_for(two_nodes, 90, what="2 alive Ray nodes")
        # The raylet itself runs with gpud's connect-retry defaults (RAY_START_DEFAULTS).
        worker_group = worker.status().process.pid
        assert worker_group is not None
        raylets = [p for p in group_members(worker_group) if _comm(p) == "raylet"]
        assert len(raylets) == 1, group_members(worker_group)
        for name, value in RAY_START_DEFAULTS.items():
            assert _environ(raylets[0]).get(name) == value, name
        # The long-lived query answers again and again from one child process.
        query = GcsNodes(RAY_EXECUTABLE, f"127.0.0.2:{gcs}")
        first = await query.alive()
        child = query._proc
        assert child is not None and sorted(n.name for n in first) == ["h1", "w1"]
        assert sorted(n.name for n in await query.alive()) == ["h1", "w1"]
        assert query._proc is child and child.returncode is None

        # kill -9 the head's whole process group: GCS is gone.
        head_pid = head.status().process.pid
        assert head_pid is not None
        pgids.append(head_pid)
        head.set_target(None)  # keep the head supervisor from restarting it

        os.killpg(head_pid, signal.SIGKILL)
        # A GCS gone is a RuntimeError naming it, within the request's bound; the child is
        # closed (its whole group killed), the next request would start a new one.
        with pytest.raises(RuntimeError, match=f"127.0.0.2:{gcs}"):
            async with asyncio.timeout(20):
                await query.alive(timeout_s=2)
        assert query._proc is None and child.returncode is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(child.pid, 0)
        worker_pid_before = worker.status().process.pid

        head2.set_target(RayTarget(role="head"))

        async def head2_ready() -> bool:
            return head2.gcs_ready_port != 0

        await async_wait_for(head2_ready, 90, what="second head GCS ready")
        gcs2 = head2.gcs_ready_port
        # Told about the new head, the worker restarts at once toward it.
        worker.set_target(RayTarget(role="worker", head_addr="127.0.0.4", gcs_port=gcs2))

        async def worker_moved() -> bool:
            nodes = await alive_ray_nodes(RAY_EXECUTABLE, f"127.0.0.4:{gcs2}")
            return sorted(n.name for n in nodes) == ["h2", "w1"]

        await async_wait_for(worker_moved, 90, what="worker registered with the new head")
        assert worker.status().process.pid != worker_pid_before
        pgids += [p for p in (worker.status().process.pid, head2.status().process.pid) if p]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        shutil.rmtree(root, ignore_errors=True)
    # Stopping by process group left nothing of ours behind.
    await asyncio.sleep(0.5)
    for pgid in pgids:
        assert group_members(pgid) == [], f"process group {pgid} still has members"
    assert ports.leases == {}


# Asks a GCS what a worker's `ray start` reads first: the session name and an alive head node.
_WORKER_VIEW_SCRIPT = """
import sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
print("imported", flush=True)
for line in sys.stdin:
    client = GcsClient(address=line.strip())
    session = client.internal_kv_get(b"session_name", b"session") is not None
    alive = GcsNodeInfo.GcsNodeState.ALIVE
    nodes = client.get_all_node_info(timeout=10, state_filter=alive).values()
    print("session", session, "head", any(n.is_head_node for n in nodes), flush=True)
"""


@pytest.mark.ray
@needs_ray
@pytest.mark.timeout(120)
async def test_a_head_is_ready_only_once_a_worker_finds_it_registered(tmp_path: Path) -> None:
    """When the supervisor announces the head's GCS, the head's node is in it: a worker
    started then is not sent into Ray's 2 s wait (node_registered). A head frozen right after
    its GCS started, and a stale address file, announce nothing."""
    root = f"/tmp/gpud-ray-test-{tmp_path.name[-12:]}"
    announced = asyncio.Event()
    query = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER_VIEW_SCRIPT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert query.stdin is not None and query.stdout is not None
    head = RaySupervisor(
        executable=RAY_EXECUTABLE,
        node_name="s1",
        node_ip="127.0.0.2",
        ports=SimplePorts(24100, 24200),
        temp_root=root,
        num_cpus=1,
        settings=SupervisorSettings(worker_ports=4, grace_s=3),
        client_server=False,
        on_change=announced.set,
    )
    # A previous run's file naming the very address this head gets (its first leased port).
    os.makedirs(head.temp_dir)
    await asyncio.to_thread(Path(head.temp_dir, RAY_ADDRESS_FILE).write_text, "127.0.0.2:24100")
    task = asyncio.create_task(head.run())
    try:
        assert await asyncio.wait_for(query.stdout.readline(), 60) == b"imported\n"
        head.set_target(RayTarget(role="head"))

        def gcs_started() -> int | None:
            leader = head.status().process.pid
            if leader is None or "gcs_server" not in map(_comm, group_members(leader)):
                return None
            return leader

        # Freeze `ray start` as soon as its GCS runs: the GCS answers, no raylet registered.
        leader = await async_wait_for(gcs_started, 60, 0.005, what="the head's GCS process")
        os.kill(leader, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.5)
            assert head.ray_ports is not None and head.ray_ports.named["port"] == 24100
            assert await gcs_serving("127.0.0.2", 24100)
            await asyncio.sleep(1.5)  # several of the supervisor's polls
            assert head.gcs_ready_port == 0
        finally:
            os.kill(leader, signal.SIGCONT)
        await asyncio.wait_for(announced.wait(), 60)
        assert head.gcs_ready_port == 24100
        query.stdin.write(b"127.0.0.2:24100\n")
        await query.stdin.drain()
        reply = await asyncio.wait_for(query.stdout.readline(), 20)
        assert reply == b"session True head True\n"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        query.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(query.pid, signal.SIGKILL)
        await query.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_a_node_is_registered_when_its_address_file_names_that_gcs(tmp_path: Path) -> None:
    assert not node_registered(str(tmp_path), "10.0.0.1:6379")  # no file yet
    (tmp_path / RAY_ADDRESS_FILE).write_text("10.0.0.1:6380")
    assert not node_registered(str(tmp_path), "10.0.0.1:6379")  # another GCS
    (tmp_path / RAY_ADDRESS_FILE).write_text("10.0.0.1:6379")
    assert node_registered(str(tmp_path), "10.0.0.1:6379")
    assert gcs_address_of("10.0.0.1", 6379) == "10.0.0.1:6379"
    assert gcs_address_of("fd00::1", 6379) == "[fd00::1]:6379"


async def test_no_ports_is_an_error_not_a_crash(tmp_path: Path) -> None:
    supervisor = RaySupervisor(
        executable=RAY_EXECUTABLE,
        node_name="p1",
        node_ip="127.0.0.2",
        ports=SimplePorts(23990, 23992),
        temp_root=str(tmp_path),
        settings=SupervisorSettings(backoff_initial_s=0.1),
    )
    task = asyncio.create_task(supervisor.run())
    try:
        supervisor.set_target(RayTarget(role="head"))

        async def failed() -> bool:
            return supervisor.status().error is not None

        await async_wait_for(failed, 10, what="a ports error")
        assert "port range exhausted" in (supervisor.status().error or "")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_crashing_ray_backs_off_with_reason(tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.write_text("#!/bin/sh\necho 'raylet failed to start' >&2\nexit 1\n")
    fake.chmod(0o755)
    ports = SimplePorts(23900, 23990)
    supervisor = RaySupervisor(
        executable=str(fake),
        node_name="c1",
        node_ip="127.0.0.2",
        ports=ports,
        temp_root=str(tmp_path),
        settings=SupervisorSettings(worker_ports=4, backoff_initial_s=0.05, backoff_max_s=0.2),
    )
    task = asyncio.create_task(supervisor.run())
    try:
        supervisor.set_target(RayTarget(role="worker", head_addr="127.0.0.3", gcs_port=1))

        async def crash_looping() -> bool:
            process = supervisor.status().process
            return process.restarts >= 3 and process.state in ("backoff", "starting", "running")

        await async_wait_for(crash_looping, 20, what="restarts with backoff")
        process = supervisor.status().process
        assert process.last_exit_code == 1 and "exited with code 1" in (process.last_error or "")
        assert supervisor.gcs_ready_port == 0
        supervisor.set_target(None)

        async def released() -> bool:
            return ports.leases == {}

        await async_wait_for(released, 10, what="leases released once Ray is not wanted")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# A stand-in gpud that runs a Ray head with its group recorded, to be kill -9ed.
_GPUD_WITH_RAY = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gpud.process_groups import GroupRecord
    from gpud.ray.supervisor import RAY_CHILD, RaySupervisor, RayTarget, SupervisorSettings
    from gpud.state import StateStore
    from tests.harness.ray_cluster import RAY_EXECUTABLE
    from tests.harness.ray_loopback import SimplePorts

    async def main():
        state, root = Path(sys.argv[1]), sys.argv[2]
        supervisor = RaySupervisor(
            executable=RAY_EXECUTABLE, node_name="old", node_ip="127.0.0.5",
            ports=SimplePorts(22000, 22500), temp_root=root, num_cpus=1,
            settings=SupervisorSettings(worker_ports=4), client_server=False,
            record=GroupRecord(StateStore(state), RAY_CHILD),
        )
        supervisor.set_target(RayTarget(role="head"))
        await supervisor.run()

    asyncio.run(main())
    """
)


@pytest.mark.ray
@needs_ray
@pytest.mark.timeout(240)
async def test_ray_left_by_a_killed_gpud_is_stopped_before_a_new_one(tmp_path: Path) -> None:
    """kill -9 of gpud alone leaves its `ray start` group running; the next gpud stops exactly
    that group before it starts Ray, so one gpud node never runs two Ray nodes."""
    root = f"/tmp/gpud-ray-test-{tmp_path.name[-12:]}"
    state = tmp_path / "state"
    gpud = subprocess.Popen(  # noqa: ASYNC220 -- the stand-in gpud, killed below
        [sys.executable, "-c", _GPUD_WITH_RAY, str(state), root],
        cwd=Path(__file__).parents[2],
    )
    store = StateStore(state)
    record = GroupRecord(store, RAY_CHILD)
    supervisor = None
    task = None
    try:
        old = await async_wait_for(record.load, 90, 0.5, what="the old Ray's group record")

        async def old_gcs_up() -> bool:
            return await gcs_healthy(RAY_EXECUTABLE, "127.0.0.5", 22000)

        await async_wait_for(old_gcs_up, 90, 1.0, what="the old head's GCS")
        os.kill(gpud.pid, signal.SIGKILL)
        gpud.wait(10)
        orphans = leftover_members(old)
        assert orphans, "kill -9 of gpud alone should leave its Ray group running"

        supervisor = RaySupervisor(
            executable=RAY_EXECUTABLE,
            node_name="new",
            node_ip="127.0.0.5",
            ports=SimplePorts(22500, 23000),
            temp_root=root,
            num_cpus=1,
            settings=SupervisorSettings(worker_ports=4, grace_s=3),
            client_server=False,
            record=record,
        )
        supervisor.set_target(RayTarget(role="head"))
        task = asyncio.create_task(supervisor.run())

        async def new_head_ready() -> bool:
            return supervisor.gcs_ready_port != 0

        await async_wait_for(new_head_ready, 120, what="the new head's GCS")
        # The old group is gone (every pid of it), the new one is recorded in its place.
        assert group_members(old.pgid) == [] and all(process_start(p) is None for p in orphans)
        new = record.load()
        assert new is not None and new != old and new.pgid == supervisor.status().process.pid
        gcs = supervisor.gcs_ready_port

        async def one_ray_node() -> bool:
            nodes = await alive_ray_nodes(RAY_EXECUTABLE, f"127.0.0.5:{gcs}")
            return [n.name for n in nodes] == ["new"]

        await async_wait_for(one_ray_node, 60, 1.0, what="exactly the new Ray node alive")
    finally:
        if gpud.poll() is None:
            gpud.kill()
        gpud.wait(10)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        shutil.rmtree(root, ignore_errors=True)
    assert record.load() is None  # a clean stop leaves no record


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_ray_start_gets_connect_defaults_unless_gpuds_environment_sets_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = RayPorts(named={"port": 30800}, min_worker_port=30810, max_worker_port=30819)

    def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
        supervisor = RaySupervisor(
            executable="ray", node_name="n", node_ip="127.0.0.1", ports=SimplePorts(1, 2), env=env
        )
        child = supervisor._child(RayTarget(role="head"), ports)
        assert child.env is not None
        return child.env

    for name, value in RAY_START_DEFAULTS.items():
        monkeypatch.delenv(name, raising=False)
        assert child_env()[name] == value
    monkeypatch.setenv("RAY_raylet_client_connect_timeout_milliseconds", "1000")
    assert child_env()["RAY_raylet_client_connect_timeout_milliseconds"] == "1000"
    # The supervisor's own env argument wins over both.
    env = child_env({"RAY_raylet_client_num_connect_attempts": "10"})
    assert env["RAY_raylet_client_num_connect_attempts"] == "10"


def test_ports_ray_reads_from_its_environment_are_passed_as_leased() -> None:
    ports = RayPorts(
        named={"port": 30800}, min_worker_port=30810, max_worker_port=30819,
        env={"AUTOSCALER_METRIC_PORT": 30801},
    )  # fmt: skip
    env = ray_start_env({"PATH": "/usr/bin"}, RayTarget(role="head"), ports)
    assert env == {"PATH": "/usr/bin", "AUTOSCALER_METRIC_PORT": "30801"}
