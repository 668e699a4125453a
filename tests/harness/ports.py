"""The ports component alone in a test: a config file for it and the running service.

Tests use ports 14000-16000 (below the default space other helpers use) and ports.reserve =
false: only the netns test touches ip_local_reserved_ports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from gpud import config
from gpud.context import NodeContext
from gpud.ports.service import PortsService
from gpud.standalone import loopback_gossip
from tests.harness.config import to_toml

ADDR = "127.0.0.1"


def write_config(workdir: Path, name: str = "n1", **ports: object) -> Path:
    """A config file for node ``name`` under ``workdir``: its own socket and state, ports
    14000-16000 in small blocks, no kernel reservation, fast settle and zombie scan."""
    settings = {
        "range_start": 14000,
        "range_end": 16000,
        "block_size": 64,
        "reserve": False,
        "settle_s": 0.05,
        "zombie_grace_s": 0.2,
        **ports,
    }
    path = workdir / f"{name}.toml"
    path.write_text(
        to_toml(
            {
                "node": {"name": name},
                "paths": {"state_dir": str(workdir / name), "runtime_dir": str(workdir)},
                "api": {"socket": f"{workdir / name}.sock"},
                "ports": settings,
            }
        )
    )
    return path


@contextlib.asynccontextmanager
async def running(cfg_path: Path, addr: str = ADDR) -> AsyncIterator[PortsService]:
    """The ports component of ``cfg_path`` running alone (loopback gossip) for the block."""
    ctx = NodeContext(config.load(str(cfg_path)), addr)
    loopback_gossip(ctx)
    service = PortsService(ctx)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
