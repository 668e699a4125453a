"""The gpus component with a fake NVML (tests/harness/fake_nvml.py) under the real code path: every
signal from the fake reaches /v1/gpus, problems (gpud doctor) with the repair action, /metrics,
the node's tags and head eligibility; lost GPUs, "not supported", unexpected NVML errors and a
hung driver; XIDs from NVML events and from a kernel log file; leases never hand out an
unhealthy GPU."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpud import config, metrics
from gpud.context import NodeContext
from gpud.errors import ApiError
from gpud.gpus import cli as gpus_cli
from gpud.gpus.service import GpuService
from gpud.standalone import loopback_gossip, serve_unix
from gpud.state import StateStore
from tests.harness import fake_nvml
from tests.harness.wait import async_wait_for

POLL_S = 0.05


class Node:
    """A fake GPU host: NVML state file, kernel log, sysfs PCI tree, gpud config."""

    def __init__(self, root: Path, gpus: int = 8) -> None:
        self.root = root
        self.nvml_file = root / "nvml.json"
        self.kmsg = root / "kmsg"
        self.kmsg.write_text("")
        self.pci = root / "pci"
        self.pci.mkdir()
        self.state = fake_nvml.node(gpus)
        self.write()
        self.set_pci(gpus)
        self.config = root / "gpud.toml"
        self.config.write_text(
            f'[node]\nname = "n1"\n[paths]\nstate_dir = "{root / "state"}"\n'
            f'runtime_dir = "{root}"\n[api]\nsocket = "{root / "api.sock"}"\n'
            f'[gpus]\nnvml_module = "tests.harness.fake_nvml"\npoll_interval_s = {POLL_S}\n'
            f'kmsg_path = "{self.kmsg}"\npci_root = "{self.pci}"\npolls_before_worse = 2\n'
            "polls_before_better = 2\nzombie_grace_s = 0.2\nnvml_timeout_s = 1.0\n"
        )

    def write(self) -> None:
        fake_nvml.write_state(self.nvml_file, self.state)

    def device(self, index: int) -> dict[str, Any]:
        return self.state["devices"][index]

    def set_readings(self, index: int, **readings: Any) -> None:
        self.device(index)["readings"].update(readings)
        self.write()

    def set_errors(self, index: int, **errors: str) -> None:
        self.device(index)["errors"] = errors
        self.write()

    def set_pci(self, count: int) -> None:
        for child in self.pci.iterdir():
            for f in child.iterdir():
                f.unlink()
            child.rmdir()
        for i in range(count):
            d = self.pci / f"0000:{0x18 + i * 0x10:02x}:00.0"
            d.mkdir()
            (d / "vendor").write_text("0x10de\n")
            (d / "class").write_text("0x030200\n")

    def kernel_xid(self, pci: str, xid: int, text: str = "") -> None:
        now_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        with self.kmsg.open("a") as f:
            f.write(f"3,{now_us},{now_us},-;NVRM: Xid (PCI:{pci}): {xid}, pid=77, {text}\n")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    monkeypatch.setenv(fake_nvml.ENV, str(tmp_path / "nvml.json"))
    return Node(tmp_path)


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[GpuService]:
    ctx = NodeContext(config.load(str(node.config)), "127.0.0.1")
    loopback_gossip(ctx)
    store = StateStore(ctx.config.state_dir)
    service = GpuService(ctx, fake_nvml, store=store)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready(), 10)
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


async def polls(service: GpuService, n: int) -> None:
    """Wait until ``n`` more polls have been judged."""
    for _ in range(n):
        seen = service._polled_at
        await async_wait_for(lambda s=seen: service._polled_at != s, 10, POLL_S / 2, what="a poll")


def gpu(service: GpuService, index: int) -> Any:
    return service.status().gpus[index]


def samples(service: GpuService, name: str) -> dict[str, float]:
    """gpu index (or "" for node-wide) -> value of the family ``name``."""
    for family in service.metrics():
        if family.name == name:
            return {labels.get("gpu", ""): value for labels, value in family.samples}
    return {}


def health_state(service: GpuService, index: int) -> str:
    for family in service.metrics():
        if family.name == "gpud_gpu_health_state":
            for labels, value in family.samples:
                if labels["gpu"] == str(index) and value == 1:
                    return labels["state"]
    return "absent"


async def test_signals_reach_status_problems_metrics_tags_and_leases(node: Node) -> None:
    async with running(node) as service:
        assert service.ctx.tags.gpu == 8
        assert service.node_verdict().state == "healthy" and not service.problems()
        status = service.status()
        assert status.summary == "8/8 GPUs healthy, node healthy"
        assert {s.name for s in status.gpus[0].signals} >= {"temperature_c", "row_remap_pending"}
        assert all(s.source for s in status.gpus[0].signals)
        assert samples(service, "gpud_gpu_temperature_celsius") == {str(i): 34.0 for i in range(8)}

        node.set_readings(2, remapped_rows=[0, 1, 1, 0])
        node.set_readings(5, temperature_c=95)
        # The remap is taken at once; the temperature only once it has held for 2 polls.
        await async_wait_for(
            lambda: gpu(service, 2).state == "unhealthy", 10, POLL_S / 2, what="GPU 2 unhealthy"
        )
        await async_wait_for(
            lambda: gpu(service, 5).state == "degraded", 10, POLL_S / 2, what="GPU 5 degraded"
        )
        assert gpu(service, 2).action == "reset_gpu"
        codes = {(p.code, p.severity, p.subject.split()[1]) for p in service.problems()}
        assert codes == {
            ("gpus.row_remap_pending", "critical", "2"),
            ("gpus.thermal", "warning", "5"),
        }
        fix = next(p.fix for p in service.problems() if p.code == "gpus.row_remap_pending")
        assert "reset the GPU" in fix and "reset_gpu" in fix
        await async_wait_for(
            lambda: service.ctx.tags.gpu == 6, 10, POLL_S / 2, what="tags carry 6 healthy GPUs"
        )
        assert service.ctx.members["n1"].tags is not None  # gossiped (loopback)
        assert service.ctx.members["n1"].tags.gpu == 6
        # The node verdict is gossiped too (tag gh): election reads it for head eligibility.
        assert service.ctx.members["n1"].tags.gh == service.node_verdict().state != "unknown"
        assert samples(service, "gpud_gpu_row_remap_pending")["2"] == 1
        assert health_state(service, 2) == "unhealthy" and health_state(service, 5) == "degraded"
        text = metrics.exposition(metrics.registry(service.metrics), None)[0].decode()
        assert 'gpud_gpu_temperature_celsius{gpu="5",model="' in text and "} 95.0" in text
        verdict = service.node_verdict()
        assert verdict.state == "degraded" and verdict.healthy_gpus == 6
        uuids = service.healthy_uuids()
        assert len(uuids) == 6 and gpu(service, 2).uuid not in uuids

        # An unhealthy GPU is never leased.
        with pytest.raises(ApiError, match="6 of 8 are healthy and unleased") as refused:
            await service.lease("big", 7)
        assert refused.value.status == 409
        assert set(service.unleased_healthy_uuids()) == set(uuids)
        lease = await service.lease("vllm", 6)
        assert set(lease.gpus) == set(uuids)
        # The cluster-wide Ray may use only healthy GPUs no lease holds: none are left.
        assert service.unleased_healthy_uuids() == []
        assert gpu(service, 0).lease == lease.id and gpu(service, 2).lease is None

        # One GPU missing from NVML while the PCI bus still has it: the node is unhealthy
        # (not Ray head material) and wants a reboot.
        node.set_pci(9)
        await async_wait_for(
            lambda: service.node_verdict().state == "unhealthy",
            10,
            POLL_S / 2,
            what="node unhealthy",
        )
        assert service.node_verdict().action in ("reboot_host", "inspect_hardware")
        assert any(p.code == "gpus.missing" for p in service.problems())

        # Repairs are taken after polls_before_better good polls.
        node.set_pci(8)
        node.set_readings(2, remapped_rows=[0, 1, 0, 0])
        node.set_readings(5, temperature_c=40)
        await async_wait_for(
            lambda: service.node_verdict().state == "healthy",
            10,
            POLL_S / 2,
            what="node healthy again",
        )
        assert service.ctx.tags.gpu == 8


async def test_gpu_lost_mid_run_and_back(node: Node) -> None:
    async with running(node) as service:
        held = await service.lease("a", 8)
        node.set_errors(3, **{"*": "gpu_is_lost"})
        await async_wait_for(
            lambda: gpu(service, 3).state == "unhealthy", 10, POLL_S / 2, what="GPU 3 lost"
        )
        lost = gpu(service, 3)
        assert lost.action == "reboot_host" and "GPU_IS_LOST" in lost.reason
        assert lost.lease == held.id  # its lease stays until released
        assert any(p.code == "gpus.lost" and p.severity == "critical" for p in service.problems())
        assert service.node_verdict().state == "degraded"
        await service.release(held.id)
        again = await service.lease("b", 7)
        assert lost.uuid not in again.gpus
        node.set_errors(3, **{"*": "reset_required"})
        await async_wait_for(
            lambda: gpu(service, 3).action == "reset_gpu",
            10,
            POLL_S / 2,
            what="GPU 3 needs a reset",
        )
        node.set_errors(3)
        await async_wait_for(
            lambda: gpu(service, 3).state == "healthy", 10, POLL_S / 2, what="GPU 3 back"
        )


async def test_not_supported_signals_are_values_not_errors(node: Node) -> None:
    unsupported = {
        fn: "not_supported"
        for fn in (
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetTemperatureThreshold",
            "nvmlDeviceGetRemappedRows",
            "nvmlDeviceGetRetiredPages",
            "nvmlDeviceGetRetiredPagesPendingStatus",
            "nvmlDeviceGetEccMode",
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetPcieReplayCounter",
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetPowerUsage",
        )
    }
    for i in range(8):
        node.device(i)["errors"] = unsupported
        node.device(i)["readings"]["nvlink_states"] = []
    node.write()
    async with running(node) as service:
        await polls(service, 2)
        status = service.status()
        assert status.healthy == 8 and status.state == "healthy"
        values = {s.name: s.value for s in status.gpus[0].signals}
        assert values["temperature_c"] == "not supported"
        assert values["row_remap_pending"] == "not supported"
        assert values["nvlink_links"] == "not supported"
        assert values["pcie_width"] == 16
        assert not service.problems()
        assert samples(service, "gpud_gpu_temperature_celsius") == {}


async def test_unexpected_nvml_errors_make_unknown_and_polling_goes_on(node: Node) -> None:
    async with running(node) as service:
        node.set_errors(0, nvmlDeviceGetTemperature="unknown")
        node.set_errors(1, nvmlDeviceGetPowerUsage="python")
        await async_wait_for(
            lambda: gpu(service, 1).state == "unknown", 10, POLL_S / 2, what="GPU 1 unknown"
        )
        assert gpu(service, 0).state == "unknown"
        assert "Unknown Error" in gpu(service, 0).reason
        assert "RuntimeError" in gpu(service, 1).reason
        assert {p.code for p in service.problems()} == {"gpus.nvml_error"}
        # Unknown GPUs are not leased either.
        assert len(service.healthy_uuids()) == 6

        node.state["count_error"] = "python"
        node.write()
        await async_wait_for(
            lambda: "cannot count the GPUs" in gpu(service, 2).reason,
            10,
            POLL_S / 2,
            what="count fails",
        )
        assert gpu(service, 2).state == "unknown" and service.node_verdict().state == "unknown"

        # A driver that does not answer: unknown within nvml_timeout_s, and polling goes on.
        node.state.pop("count_error")
        node.state["hang_s"] = 3
        node.write()
        await async_wait_for(
            lambda: "did not answer" in gpu(service, 2).reason,
            15,
            POLL_S / 2,
            what="NVML hang seen",
        )
        assert gpu(service, 2).state == "unknown"
        node.state["hang_s"] = 0
        node.set_errors(0)
        node.set_errors(1)
        await async_wait_for(
            lambda: service.node_verdict().state == "healthy", 20, POLL_S / 2, what="recovered"
        )


async def test_xids_from_nvml_events_and_the_kernel_log(node: Node) -> None:
    async with running(node) as service:
        await async_wait_for(
            lambda: service.status().nvml_events == "watching",
            10,
            POLL_S / 2,
            what="NVML events watched",
        )
        node.state["events"] = [{"seq": 1, "index": 4, "xid": 48}]
        node.write()
        await async_wait_for(
            lambda: gpu(service, 4).state == "unhealthy", 10, POLL_S / 2, what="XID 48 on GPU 4"
        )
        assert gpu(service, 4).action == "reset_gpu"
        assert gpu(service, 4).xids[0].source == "nvml-event"
        assert samples(service, "gpud_gpu_last_xid")["4"] == 48

        pci6 = gpu(service, 6).pci
        node.kernel_xid(pci6, 13, "Graphics Exception")
        await async_wait_for(
            lambda: gpu(service, 6).state == "degraded", 10, POLL_S / 2, what="XID 13 on GPU 6"
        )
        assert gpu(service, 6).action == "restart_app"
        assert "Graphics Exception" in gpu(service, 6).reason
        assert samples(service, "gpud_gpu_xid_total")["6"] == 1

        # A GPU that fell off the bus is gone from NVML, so its XID matches no GPU: the node.
        node.kernel_xid("0000:f0:00", 79, "GPU has fallen off the bus.")
        await async_wait_for(
            lambda: service.node_verdict().state == "unhealthy", 10, POLL_S / 2, what="XID 79"
        )
        assert service.node_verdict().action == "reboot_host"
        assert service.status().unmatched_xids[0].xid == 79
        assert any(p.code == "gpus.xid" and p.subject == "gpus" for p in service.problems())


async def test_without_nvml_the_component_says_why(node: Node) -> None:
    node.state["init"] = "library_not_found"
    node.write()
    node.set_pci(0)
    async with running(node) as service:
        status = service.status()
        assert status.nvml == "NVML Shared Library Not Found"
        assert "NVML unavailable" in status.summary and status.count == 0
        assert status.state == "healthy" and service.ctx.tags.gpu == 0
        with pytest.raises(ApiError, match="cannot lease 1 GPU"):
            await service.lease("x", 1)
        # NVIDIA GPUs on the bus but no driver: unknown, with the fix.
        node.set_pci(2)
        await async_wait_for(
            lambda: service.node_verdict().state == "unknown",
            10,
            POLL_S / 2,
            what="unknown without NVML",
        )
        problem = service.problems()[0]
        assert problem.code == "gpus.nvml_unavailable" and "driver" in problem.fix


async def test_leases_are_durable_and_dead_owners_are_reclaimed(node: Node) -> None:
    async with running(node) as service:
        child = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            doomed = await service.lease("model-a", 3, pid=child.pid)
            kept = await service.lease("me", 2, pid=os.getpid())
        finally:
            child.kill()
            await child.wait()
        await async_wait_for(
            lambda: doomed.id not in {x.id for x in service.leases()},
            10,
            POLL_S / 2,
            what="reclaimed",
        )
        with pytest.raises(ApiError, match="not a running process"):
            await service.lease("ghost", 1, pid=child.pid)
    async with running(node) as again:
        assert [x.id for x in again.leases()] == [kept.id]
        assert again.leases()[0].gpus == kept.gpus


async def test_cli_shows_verdicts_and_leases(node: Node) -> None:
    async with running(node) as service:
        node.set_readings(1, ecc_volatile_uncorrected=3)
        await async_wait_for(
            lambda: gpu(service, 1).state == "unhealthy", 10, POLL_S / 2, what="GPU 1 unhealthy"
        )
        sock = str(node.root / "cli.sock")
        runner = await serve_unix(service, sock)
        try:
            parser = argparse.ArgumentParser()
            gpus_cli.add_commands(parser.add_subparsers(dest="command"))

            def run(*argv: str) -> str:
                args = parser.parse_args(["gpus", "--socket", sock, *argv])
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert args.func(args) == 0
                return out.getvalue()

            shown = await asyncio.to_thread(run)
            assert "7/8 GPUs healthy" in shown
            assert "uncorrected ECC" in shown and "repair action: reset_gpu" in shown
            line = await asyncio.to_thread(run, "lease", "--owner", "job", "--count", "2")
            lease_id, uuids, indices = line.strip().split("\t")
            assert len(uuids.split(",")) == 2 and gpu(service, 1).uuid not in uuids
            # The third column is what CUDA_VISIBLE_DEVICES takes: NVML indices of those GPUs.
            assert [gpu(service, int(i)).uuid for i in indices.split(",")] == uuids.split(",")
            assert lease_id in await asyncio.to_thread(run)
            await asyncio.to_thread(run, "release", lease_id)
            assert service.leases() == []
            # An owner is free text from any caller: a terminal escape in it is shown, not run.
            hostile = await service.lease("job\x1b[2J\x1b]0;pwned\x07", 1)
            shown = await asyncio.to_thread(run)
            assert "\x1b" not in shown and "\x07" not in shown
            assert f"lease {hostile.id} job\\x1b[2J\\x1b]0;pwned\\x07 " in shown
        finally:
            await runner.cleanup()


async def test_an_unreadable_kernel_log_is_a_problem_with_a_fix(node: Node) -> None:
    """A GPU host whose XID source is gone says so as a problem, not only in a status field."""
    node.kmsg.unlink()
    async with running(node) as service:
        await async_wait_for(
            lambda: service.status().kmsg.startswith("not used"),
            10,
            POLL_S / 2,
            what="kmsg not used",
        )
        [problem] = [p for p in service.problems() if p.code == "gpus.xid_source_unavailable"]
        assert problem.severity == "warning" and problem.subject == str(node.kmsg)
        assert "No such file" in problem.message and "kmsg_path" in problem.fix
        families = {f.name: f.samples for f in service.metrics()}
        assert ({"source": "kmsg"}, 0.0) in families["gpud_gpu_xid_source_up"]


def test_a_denied_kernel_log_names_the_units_capability() -> None:
    from gpud.gpus import kmsg

    why = kmsg.unreadable("/dev/kmsg", PermissionError(13, "Permission denied"))
    assert why.reason == "cannot read /dev/kmsg (Permission denied)"
    assert "CAP_SYSLOG" in why.fix and "ProtectKernelLogs" in why.fix
