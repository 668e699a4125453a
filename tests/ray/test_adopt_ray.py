"""Adopting Ray and serf across a gpud restart: the pure decisions (which recorded
Ray node may be adopted, how long an adopted one outlives a plan without a target, which serf
configuration still matches, which tags an adopted serf keeps gossiping), and the Ray
supervisor adopting a stand-in Ray node its predecessor left, or stopping one it cannot
verify."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gpud.process_groups import ChildGroup, GroupRecord, argv_matches, group_members, process_start
from gpud.ray.election import Plan
from gpud.ray.supervisor import (
    RAY_CHILD,
    RAY_RUN,
    RayAdoption,
    RayPorts,
    RayRun,
    RaySupervisor,
    RayTarget,
    SupervisorSettings,
    adoption_refusal,
)
from gpud.ray.target import ADOPT_SETTLE_S, keep_adopted
from gpud.serf.adoption import config_refusal, restored_tags
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.wait import async_wait_for

PORTS = RayPorts(
    named={"port": 26000, "node-manager-port": 26001}, min_worker_port=26010, max_worker_port=26020
)
HEAD = RayRun(target=RayTarget(role="head", node_ip="10.0.0.1"), ports=PORTS, leases=["a", "b"])
WORKER = msgspec.structs.replace(
    HEAD, target=RayTarget(role="worker", head_addr="10.0.0.2", gcs_port=26000)
)
GROUP = ChildGroup(pgid=4242, start=99)
ARGV = ["/opt/ray/bin/ray", "start", "--block", "--head", "--port=26000"]
# The program is an interpreter running ray's script: argv[0] differs, the arguments do not.
CMDLINE = ["/usr/bin/python3", "/opt/ray/bin/ray", "start", "--block", "--head", "--port=26000"]


def refusal(run: RayRun | None = HEAD, **changes: object) -> str | None:
    args: dict[str, object] = {
        "group": GROUP,
        "leader_ok": True,
        "argv": ARGV,
        "cmdline": CMDLINE,
        "held": {"a", "b", "c"},
        "gcs_ok": True,
    }
    args.update(changes)
    return adoption_refusal(run, **args)  # type: ignore[arg-type]


def test_a_verified_ray_node_is_adopted() -> None:
    assert refusal() is None
    assert refusal(WORKER, gcs_ok=None) is None  # a worker has no GCS to ask


def test_each_failed_check_refuses_with_its_reason() -> None:
    assert refusal(None) == "no recorded Ray node"
    assert refusal(group=None) == "no recorded process group"
    assert refusal(leader_ok=False) == "its recorded leader is not that process"
    assert refusal(cmdline=None).startswith("another command line")
    assert refusal(cmdline=[*CMDLINE[:-1], "--port=26001"]).startswith("another command line")
    assert refusal(held={"a"}) == "its port leases are gone (b)"
    assert refusal(gcs_ok=False) == "its GCS does not answer"


@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6),
    st.lists(st.text(max_size=8), max_size=3),
)
def test_argv_matches_only_its_own_arguments(argv: list[str], prefix: list[str]) -> None:
    assert argv_matches([*prefix, "/bin/interp", *argv[1:]], argv)
    if len(argv) > 1:
        assert not argv_matches([*prefix, "/bin/interp", *argv[1:-1], argv[-1] + "x"], argv)
    assert not argv_matches(argv[:-1], argv)


ACTIONS = st.sampled_from(["lead", "stand", "follow", "step_down", "wait"])
CODES = st.sampled_from(["", "no_majority", "gcs_unreachable"])


@given(ACTIONS, CODES, st.booleans(), st.floats(min_value=0, max_value=3 * ADOPT_SETTLE_S))
def test_an_adopted_node_is_kept_only_while_the_plan_waits(
    action: str, code: str, adopted: bool, age: float
) -> None:
    plan = Plan(action=action, term=3, code=code)  # type: ignore[arg-type]
    kept = keep_adopted(plan, adopted, age)
    assert kept == (adopted and action == "wait" and code != "no_majority" and age < ADOPT_SETTLE_S)


WRITTEN = {"node_name": "n1", "bind": "10.0.0.1:7946", "rpc_auth": "t", "tags": {"v": "1"}}


def test_serf_config_must_match_but_for_its_tags() -> None:
    assert config_refusal(WRITTEN, {**WRITTEN, "tags": {"v": "1", "ray": "head"}}) is None
    assert config_refusal(None, WRITTEN) == "its configuration file cannot be read"
    moved = {**WRITTEN, "bind": "10.0.0.9:7946"}
    assert config_refusal(WRITTEN, moved) == "its configuration differs (bind)"
    assert config_refusal(WRITTEN, {**WRITTEN, "retry_join": ["x"]}) == (
        "its configuration differs (retry_join)"
    )


TAGS = st.builds(
    Tags,
    ray=st.sampled_from(["none", "worker", "head"]),
    term=st.integers(0, 50),
    gcs=st.integers(0, 65535),
    gpu=st.integers(0, 8),
    pp=st.integers(1, 65535),
)


@given(TAGS, TAGS, TAGS)
def test_restored_tags_keep_the_predecessors_but_what_changed_since(
    announced: Tags, current: Tags, initial: Tags
) -> None:
    restored = restored_tags(announced, current, initial)
    for field in Tags.__struct_fields__:
        mine = getattr(current, field)
        expected = mine if mine != getattr(initial, field) else getattr(announced, field)
        assert getattr(restored, field) == expected, field
    assert restored_tags(announced, initial, initial) == announced


# A stand-in `ray` that keeps its command line and runs until killed (no Ray needed: a worker
# target has no GCS to check). Its group, leases and RayRun are what a real one would leave.
_FAKE_RAY = "#!{python}\nimport time\nprint('ray node up', flush=True)\ntime.sleep(600)\n"


class BookPorts:
    """Leases with owners (the slice of the port service adoption uses)."""

    def __init__(self) -> None:
        self.leases_by_id: dict[str, tuple[list[int], int | None]] = {}
        self.released: list[str] = []
        self._next = 23000

    async def ready(self) -> None:
        return None

    async def lease(
        self, owner: str, count: int, *, contiguous: bool = False, pid: int | None = None
    ) -> SimpleLease:
        ports = list(range(self._next, self._next + count))
        self._next += count
        lease = SimpleLease(id=f"l{len(self.leases_by_id)}", ports=ports)
        self.leases_by_id[lease.id] = (ports, pid)
        return lease

    async def release(self, lease_id: object) -> None:
        self.leases_by_id.pop(str(lease_id), None)
        self.released.append(str(lease_id))

    async def transfer(self, lease_id: str, pid: int) -> None:
        ports, _ = self.leases_by_id[lease_id]
        self.leases_by_id[lease_id] = (ports, pid)

    def leases(self) -> list[SimpleLease]:
        return [SimpleLease(id=i, ports=p) for i, (p, _) in self.leases_by_id.items()]


class SimpleLease(msgspec.Struct):
    id: str
    ports: list[int]


def fake_supervisor(tmp_path: Path, ports: BookPorts, *, num_cpus: int = 1) -> RaySupervisor:
    ray = tmp_path / "ray"
    ray.write_text(_FAKE_RAY.format(python=sys.executable))
    ray.chmod(0o755)
    store = StateStore(tmp_path / "state")
    return RaySupervisor(
        executable=str(ray),
        node_name="n1",
        node_ip="127.0.0.1",
        ports=ports,
        temp_root=str(tmp_path / "tmp"),
        num_cpus=num_cpus,
        client_server=False,
        settings=SupervisorSettings(worker_ports=2, grace_s=2.0),
        record=GroupRecord(store, RAY_CHILD),
        adoption=RayAdoption.under_key(
            store,
            RAY_RUN,
            tmp_path / "logs" / "ray.log",
            ports.transfer,
            lambda: {lease.id for lease in ports.leases()},
        ),
    )


TARGET = RayTarget(role="worker", head_addr="127.0.0.2", gcs_port=26000, node_ip="127.0.0.1")


async def test_ray_node_left_by_gpud_is_adopted_and_one_it_cannot_verify_is_stopped(
    tmp_path: Path,
) -> None:
    ports = BookPorts()
    first = fake_supervisor(tmp_path, ports)
    first.set_target(TARGET)
    task = asyncio.create_task(first.run())
    await async_wait_for(lambda: first.status().process.pid, 20, 0.1, what="the Ray node")
    pid = first.status().process.pid
    assert pid is not None
    task.cancel()  # gpud's exit
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert first.left_running and process_start(pid) is not None
    leases = set(ports.leases_by_id)
    assert len(leases) == 2 and not ports.released

    # The next gpud, same config: adopted, same pid, same target, leases moved to it.
    second = fake_supervisor(tmp_path, ports)
    task = asyncio.create_task(second.run())
    await asyncio.wait_for(second.settled.wait(), 10)
    assert second.adopted_at and second.target == TARGET
    await async_wait_for(lambda: second.status().process.pid == pid, 5, 0.1, what="the adopted pid")
    assert {owner for _, owner in ports.leases_by_id.values()} == {os.getpid()}
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert process_start(pid) is not None

    # A gpud that would run another command line (num_cpus changed): not adopted; exactly
    # that group is stopped and its leases released before it starts its own.
    third = fake_supervisor(tmp_path, ports, num_cpus=2)
    task = asyncio.create_task(third.run())
    try:
        await asyncio.wait_for(third.settled.wait(), 20)
        assert not third.adopted_at
        assert process_start(pid) is None and not group_members(pid)
        assert leases <= set(ports.released)
    finally:
        third.set_target(None)
        await async_wait_for(lambda: third.status().process.pid is None, 20, 0.1, what="stop")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
