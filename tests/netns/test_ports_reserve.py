"""Kernel reservation of the block, in a fresh network namespace of our own (never the host's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSCTL = "/proc/sys/net/ipv4/ip_local_reserved_ports"
PRE_EXISTING = "5000,6000-6010"


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    name = f"gp-res-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(ns: str, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_service_reserves_its_block_and_keeps_other_entries(netns: str) -> None:
    # "Other software" reserved some ports in this namespace before gpud started.
    assert in_netns(netns, "sh", "-c", f"echo {PRE_EXISTING} > {SYSCTL}").returncode == 0
    workdir = Path(tempfile.mkdtemp(prefix="gp-res-"))
    try:
        cfg = workdir / "gpud.toml"
        cfg.write_text(
            f'[node]\nname = "r1"\n[paths]\nstate_dir = "{workdir}/state"\n'
            f'[api]\nsocket = "{workdir}/api.sock"\n'
            "[ports]\nrange_start = 14000\nrange_end = 16000\nblock_size = 64\n"
            "reserve = true\nsettle_s = 0.05\n"
        )
        script = (
            "import asyncio, json, sys\n"
            "from gpud import config\n"
            "from gpud.context import NodeContext\n"
            "from gpud.ports.service import PortsService\n"
            "from gpud.standalone import loopback_gossip\n"
            "async def main():\n"
            "    ctx = NodeContext(config.load(sys.argv[1]), '127.0.0.1')\n"
            "    loopback_gossip(ctx)\n"
            "    svc = PortsService(ctx)\n"
            "    task = asyncio.create_task(svc.run())\n"
            "    await asyncio.wait_for(svc.ready(), 20)\n"
            "    print(json.dumps({'block': [svc.block_range().start, svc.block_range().stop-1],\n"
            "        'reservation': svc.status().reservation, 'summary': svc.status().summary}))\n"
            "    task.cancel()\n"
            "asyncio.run(main())\n"
        )
        run = in_netns(netns, sys.executable, "-c", script, str(cfg))
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        lo, hi = result["block"]
        assert result["reservation"] == "reserved"
        after = in_netns(netns, "cat", SYSCTL).stdout.strip()
        assert after == f"{PRE_EXISTING},{lo}-{hi}"
        # The host's namespace is untouched.
        assert f"{lo}-{hi}" not in Path(SYSCTL).read_text()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_reserve_and_unreserve_touch_only_our_range(netns: str) -> None:
    # Overlapping pre-existing entry: unreserving removes only what gpud added.
    assert in_netns(netns, "sh", "-c", f"echo 14010-14020,5000 > {SYSCTL}").returncode == 0
    script = (
        "import json\n"
        "from gpud.ports import reserve\n"
        "r = reserve.reserve((14000, 14063))\n"
        "mid = open(reserve.RESERVED_PORTS).read().strip()\n"
        "err = reserve.unreserve(r.added)\n"
        "print(json.dumps({'added': r.added, 'error': r.error, 'mid': mid, 'err': err,\n"
        "    'end': open(reserve.RESERVED_PORTS).read().strip()}))\n"
    )
    run = in_netns(netns, sys.executable, "-c", script)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["error"] is None and out["err"] is None
    assert out["added"] == [[14000, 14009], [14021, 14063]]
    assert out["mid"] == "5000,14000-14063"
    assert out["end"] == "5000,14010-14020"


def test_read_only_proc_sys_is_reported_as_not_permitted(netns: str) -> None:
    # A container's /proc/sys is mounted read-only: gpud must say exactly that.
    script = (
        "import json\n"
        "from gpud.ports import reserve\n"
        "print(json.dumps(reserve.reserve((14000, 14063)).error))\n"
    )
    shell = (
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
        f'exec "{sys.executable}" -c "$0"'
    )
    run = in_netns(netns, "unshare", "-m", "--propagation", "private", "sh", "-c", shell, script)
    assert run.returncode == 0, run.stderr
    error = json.loads(run.stdout)
    assert error is not None and error.startswith("not permitted to write " + SYSCTL)
    assert in_netns(netns, "cat", SYSCTL).stdout.strip() == ""
