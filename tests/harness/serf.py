"""Real `serf agent` processes for tests: loopback only, unique ports, own process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from gpud.config import Config
from gpud.process import ChildProcess
from gpud.serf.agent import SerfAgent
from gpud.serf.rpc import SerfConnectionError, SerfRPC
from tests.harness.config import config_for


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free for both TCP and UDP on ``host`` (Serf gossips over both)."""
    found: list[int] = []
    for _ in range(200 * count):
        port = random.randint(40000, 59000)
        if port in found:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((host, port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((host, port))
        except OSError:
            continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free port found")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


class RawSerf:
    """One bare `serf agent` configured by a JSON file, with rpc_auth."""

    def __init__(
        self, workdir: Path, name: str, *, ip: str = "127.0.0.1", tags: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.ip = ip
        self.bind_port = free_port(ip)
        self.rpc_port = free_port("127.0.0.1")
        self.token = secrets.token_hex(16)
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "node_name": name,
            "bind": f"{ip}:{self.bind_port}",
            "rpc_addr": f"127.0.0.1:{self.rpc_port}",
            "rpc_auth": self.token,
            "tags": tags or {},
            "log_level": "warn",
        }
        self.config_file = self.dir / "serf.json"
        self.config_file.write_text(json.dumps(config))
        self.child = ChildProcess(
            f"test-serf-{name}", ["serf", "agent", "-config-file", str(self.config_file)]
        )

    @property
    def gossip_addr(self) -> str:
        return f"{self.ip}:{self.bind_port}"

    async def start(self) -> None:
        await self.child.start()

    async def connect(self, deadline_s: float = 10.0) -> SerfRPC:
        """Connect (retrying while the agent starts up)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            try:
                return await SerfRPC.connect("127.0.0.1", self.rpc_port, self.token)
            except SerfConnectionError:
                if loop.time() > end or self.child.returncode is not None:
                    raise
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await self.child.stop(grace_s=2.0)


@contextlib.asynccontextmanager
async def running(agent: SerfAgent) -> AsyncIterator[asyncio.Task[None]]:
    """Run a SerfAgent for the block; after it, its serf child must have exited (a cancelled
    agent leaves serf to the next gpud: here it is told to stop it)."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        agent.supervisor.stop_on_cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert agent.supervisor.child is None or agent.supervisor.child.returncode is not None


def node_config(
    tmp: Path,
    name: str,
    *,
    retry_join: list[str] | None = None,
    binary: str = "serf",
    ip: str = "127.0.0.1",
) -> Config:
    """A gpud Config for one test node: own state dir, free ports (checked on all addresses
    so the node can be re-advertised on another loopback address)."""
    ports = {free_port("0.0.0.0") for _ in range(3)}
    while len(ports) < 3:
        ports.add(free_port("0.0.0.0"))
    bind_port, rpc_port, peer_port = sorted(ports)
    # config_for: an unkeyed test cluster, on purpose.
    return config_for(
        name,
        tmp / name,
        {
            "log_level": "warning",
            "node": {"advertise": ip},
            "serf": {
                "binary": binary,
                "bind_port": bind_port,
                "rpc_port": rpc_port,
                "retry_join": retry_join or [],
                "retry_interval_s": 0.5,
                "leave_timeout_s": 3,
            },
            "peer": {"port": peer_port},
        },
    )
