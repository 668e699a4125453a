"""GPU leases over real sockets against a gpud process (`python -m gpud.standalone gpus`) on a fake
8-GPU node: HTTP errors, an unhealthy GPU never leased, a 10,000-request lease/release storm
with no GPU held twice, and kill -9 mid-storm losing no acknowledged lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from gpud.gpus.leases import GpuLeaseTable
from gpud.state import StateStore
from tests.harness import fake_nvml
from tests.harness.config import to_toml
from tests.harness.lease_storm import unix_session
from tests.harness.wait import async_wait_for

URL = "http://gpud/v1/gpus/leases"


def write_config(workdir: Path) -> Path:
    fake_nvml.write_state(workdir / "nvml.json", fake_nvml.node(8))
    (workdir / "kmsg").write_text("")
    path = workdir / "gpud.toml"
    path.write_text(
        to_toml(
            {
                "node": {"name": "n1"},
                "paths": {"state_dir": str(workdir / "state"), "runtime_dir": str(workdir)},
                "api": {"socket": str(workdir / "api.sock")},
                "gpus": {
                    "nvml_module": "tests.harness.fake_nvml",
                    "poll_interval_s": 0.1,
                    "kmsg_path": str(workdir / "kmsg"),
                    "pci_root": str(workdir / "pci"),
                },
            }
        )
    )
    return path


@contextlib.contextmanager
def gpud_process(workdir: Path) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, fake_nvml.ENV: str(workdir / "nvml.json")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.standalone", "gpus", str(workdir / "gpud.toml")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout is not None, "gpus service did not start in 30 s"
        assert proc.stdout.readline().startswith("ready"), "gpus service failed to start"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_bad_requests_and_unhealthy_gpus_are_refused(workdir: Path) -> None:
    write_config(workdir)
    with gpud_process(workdir):
        async with unix_session(workdir / "api.sock") as http:
            for body in [
                b"not json",
                b'{"owner": "x"}',
                b'{"owner": "x", "count": 0}',
                b'{"owner": "", "count": 1}',
                b'{"owner": "x", "count": 1, "colour": "red"}',
                b'{"owner": "x", "count": 1, "pid": -4}',
            ]:
                resp = await http.post(URL, data=body)
                assert resp.status == 400, body
                assert (await resp.json())["error"], body
            gone = await http.delete(f"{URL}/nope")
            assert gone.status == 404 and "no GPU lease" in (await gone.json())["error"]
            assert await (await http.get(URL)).json() == []

            state = fake_nvml.node(8)
            state["devices"][3]["readings"]["ecc_volatile_uncorrected"] = 1
            fake_nvml.write_state(workdir / "nvml.json", state)

            async def judged() -> dict | None:
                info = await (await http.get("http://gpud/v1/gpus")).json()
                return info if info["gpus"][3]["state"] == "unhealthy" else None

            info = await async_wait_for(judged, 10, 0.1, what="GPU 3 judged unhealthy")
            bad = info["gpus"][3]["uuid"]
            assert info["gpus"][3]["action"] == "reset_gpu"
            signals = {s["name"]: s for s in info["gpus"][3]["signals"]}
            assert signals["ecc_volatile_uncorrected"]["value"] == 1
            assert "nvmlDeviceGetTotalEccErrors" in signals["ecc_volatile_uncorrected"]["source"]
            full = await http.post(URL, json={"owner": "all", "count": 8})
            assert full.status == 409 and "7 of 8" in (await full.json())["error"]
            ok = await http.post(URL, json={"owner": "seven", "count": 7})
            assert ok.status == 201 and bad not in (await ok.json())["gpus"]
            more = await http.post(URL, json={"owner": "x", "count": 1})
            assert more.status == 409


REQUESTS = 10_000


async def _storm_client(
    http: aiohttp.ClientSession, held: set[str], rng: random.Random, counts: dict[str, int]
) -> None:
    """Lease 1-2 GPUs and release them, until the clients together sent REQUESTS requests."""
    while counts["requests"] < REQUESTS:
        count = rng.randint(1, 2)
        counts["requests"] += 1
        resp = await http.post(URL, json={"owner": "storm", "count": count})
        if resp.status == 409:
            # Every GPU is held by other clients right now: a valid answer, not a lease.
            assert "cannot lease" in (await resp.json())["error"]
            counts["refused"] += 1
            continue
        assert resp.status == 201, await resp.text()
        lease = await resp.json()
        gpus = lease["gpus"]
        assert len(gpus) == count
        assert not held.intersection(gpus), f"GPU leased twice: {held.intersection(gpus)}"
        held.update(gpus)
        counts["granted"] += 1
        # Give the GPUs up before the release is sent: afterwards they may be re-leased.
        held.difference_update(gpus)
        counts["requests"] += 1
        deleted = await http.delete(f"{URL}/{lease['id']}")
        assert deleted.status == 204


async def test_ten_thousand_concurrent_lease_requests_never_double_a_gpu(workdir: Path) -> None:
    write_config(workdir)
    sock = workdir / "api.sock"
    with gpud_process(workdir):
        held: set[str] = set()
        counts = {"requests": 0, "granted": 0, "refused": 0}
        sessions = [unix_session(sock) for _ in range(16)]
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        _storm_client(s, held, random.Random(i), counts)
                        for i, s in enumerate(sessions)
                    )
                ),
                240,
            )
        finally:
            for s in sessions:
                await s.close()
        elapsed = time.monotonic() - started
        assert counts["requests"] >= REQUESTS and counts["granted"] > 2000
        print(f"\n{counts} in {elapsed:.1f} s ({counts['requests'] / elapsed:.0f} requests/s)")
        async with unix_session(sock) as probe:
            assert await (await probe.get(URL)).json() == []


async def test_kill_9_mid_storm_loses_no_acknowledged_lease(workdir: Path) -> None:
    write_config(workdir)
    sock = workdir / "api.sock"
    # Leases acknowledged and not yet given back (no DELETE sent): these must survive.
    holding: dict[str, list[str]] = {}
    acked = 0
    killed = asyncio.Event()
    with gpud_process(workdir) as proc:

        async def client(http: aiohttp.ClientSession, rng: random.Random) -> None:
            nonlocal acked
            while not killed.is_set():
                try:
                    resp = await http.post(URL, json={"owner": "crash", "count": 1})
                    if resp.status != 201:
                        await resp.read()
                        await asyncio.sleep(0.001)
                        continue
                    lease = await resp.json()
                except (aiohttp.ClientError, ConnectionError):
                    return
                holding[lease["id"]] = lease["gpus"]
                acked += 1
                if acked >= 300 and not killed.is_set():
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
                    return
                await asyncio.sleep(rng.random() * 0.002)
                del holding[lease["id"]]
                try:
                    await http.delete(f"{URL}/{lease['id']}")
                except (aiohttp.ClientError, ConnectionError):
                    return

        sessions = [unix_session(sock) for _ in range(16)]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(client(s, random.Random(i)) for i, s in enumerate(sessions))),
                120,
            )
        finally:
            for s in sessions:
                await s.close()
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    assert acked >= 300 and holding
    store = StateStore(workdir / "state")
    try:
        stored = {s.lease.id: s.lease.gpus for s in GpuLeaseTable(store).load()}
    finally:
        store.close()
    for lease_id, gpus in holding.items():
        assert stored.get(lease_id) == gpus, f"acknowledged lease {lease_id} lost"
    every = [g for gpus in stored.values() for g in gpus]
    assert len(every) == len(set(every)) <= 8, "a GPU is in two stored leases"
    # A restarted gpud serves the same leases.
    with gpud_process(workdir):
        async with unix_session(sock) as http:
            after = await (await http.get(URL)).json()
    assert {lease["id"]: lease["gpus"] for lease in after} == stored
