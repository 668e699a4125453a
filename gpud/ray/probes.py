"""What gpud asks Ray, each a bounded subprocess (gpud.process.run_bounded) or a TCP connect:
is the `ray` executable usable, does a GCS answer, which Ray nodes does a GCS see alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Sequence

import msgspec

from gpud.netprobe import tcp_connect
from gpud.process import run_bounded

# `ray health-check` imports Ray (about a second) and makes one GCS RPC.
HEALTH_CHECK_TIMEOUT_S = 20.0
GCS_CONNECT_TIMEOUT_S = 1.0


class RayInstall(msgspec.Struct, kw_only=True):
    """What the configured `ray` executable can do."""

    # None when `ray --version` runs; otherwise why Ray is not available.
    reason: str | None = None
    version: str = ""
    # Ray Client (ray[client]) importable: then its server port must be passed explicitly,
    # or Ray binds 10001; without it `ray start` refuses the flag.
    client: bool = False


_CLIENT_PROBE = (
    "from ray._private.utils import get_ray_client_dependency_error as e; "
    "print('client' if e() is None else 'noclient')"
)


async def probe_ray(executable: str, timeout_s: float = 60.0) -> RayInstall:
    """Run `<executable> --version` (bounded) and check for Ray Client support."""
    resolved = shutil.which(executable)
    if resolved is None:
        return RayInstall(reason=f"ray executable {executable!r} not found")
    try:
        result = await run_bounded([resolved, "--version"], timeout_s)
    except OSError as exc:
        return RayInstall(reason=f"ray executable {resolved} cannot run: {exc.strerror}")
    if result.code != 0:
        status = "timeout" if result.code is None else result.code
        last = result.stderr.splitlines()[-1:] or [result.last_line]
        return RayInstall(reason=f"`{resolved} --version` failed ({status}): {last[0]}"[:300])
    python = python_of(resolved)
    client = True  # unknown interpreter: pass the port; Ray names the problem if it objects
    if python is not None:
        with contextlib.suppress(OSError):
            probe = await run_bounded([python, "-c", _CLIENT_PROBE], timeout_s)
            client = probe.code == 0 and probe.last_line == "client"
    return RayInstall(version=result.last_line.removeprefix("ray, version ").strip(), client=client)


async def gcs_healthy(executable: str, host: str, port: int) -> bool:
    """GCS readiness: a TCP connect (cheap, filters the first second), then `ray health-check`,
    which opens a GcsClient and reads the cluster version from GCS's KV store over gRPC, so a
    GCS that accepts connections but cannot serve yet does not pass (KubeRay probes the same way).
    """
    if not (await tcp_connect(host, port, GCS_CONNECT_TIMEOUT_S)).ok:
        return False
    try:
        result = await run_bounded(
            [executable, "health-check", f"--address={host}:{port}"], HEALTH_CHECK_TIMEOUT_S
        )
    except OSError:
        return False
    return result.code == 0


# HTTP/2 connection preface and an empty SETTINGS frame: any gRPC server answers with its own
# SETTINGS frame (type 4) before anything else.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 4


async def gcs_serving(host: str, port: int, timeout_s: float = GCS_CONNECT_TIMEOUT_S) -> bool:
    """GCS readiness without a subprocess: connect and speak the HTTP/2 preface; a GCS whose
    gRPC server runs (Ray starts it once its tables are loaded) answers with a SETTINGS frame.
    Milliseconds, where `ray health-check` (gcs_healthy) imports Ray for a second or more."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_H2_PREFACE)
                await writer.drain()
                header = await reader.readexactly(9)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return header[3] == _H2_SETTINGS


# One long-lived Python child per GCS query: it imports Ray and connects once (a second or more
# of CPU), then answers one "which nodes are alive" per request line ("TIMEOUT ADDRESS") in
# milliseconds, connecting again only when the address changes. A subprocess per poll cost
# every node that second each time, and during a failover all of them at once, next to the
# Ray nodes starting. It exits when its stdin closes (gpud gone).
_NODES_SCRIPT = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
client, connected = None, None
for line in sys.stdin:
    timeout, _, address = line.strip().partition(" ")
    try:
        if address != connected:
            client, connected = GcsClient(address=address), address
        infos = client.get_all_node_info(
            timeout=float(timeout), state_filter=GcsNodeInfo.GcsNodeState.ALIVE
        ).values()
        reply = {"nodes": [
            {"name": i.node_name, "ip": i.node_manager_address, "head": i.is_head_node}
            for i in infos
        ]}
    except Exception as exc:
        client, connected = None, None
        reply = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("gpud-nodes " + json.dumps(reply), flush=True)
"""
_REPLY_PREFIX = b"gpud-nodes "
# Importing Ray and opening the GcsClient, on top of a request's own timeout.
NODES_START_S = 20.0


class RayNode(msgspec.Struct, kw_only=True):
    name: str
    ip: str
    head: bool


class _NodesReply(msgspec.Struct):
    nodes: list[RayNode] | None = None
    error: str | None = None


class GcsNodes:
    """Which nodes one GCS sees alive, through one long-lived child (see _NODES_SCRIPT).
    ``gcs_address`` may be changed between requests: the child keeps its Ray import and
    connects to the new address on the next one.

    The child runs in its own process group and is killed by that group only; a request that
    times out, or a child that exits, closes it, and the next request starts a new one.
    ``argv_prefix`` runs it through a wrapper (e.g. `ip netns exec NS`)."""

    def __init__(self, executable: str, gcs_address: str, *, argv_prefix: Sequence[str] = ()):
        self.gcs_address = gcs_address
        self._executable = executable
        self._prefix = list(argv_prefix)
        self._proc: asyncio.subprocess.Process | None = None

    async def alive(self, timeout_s: float = 10.0) -> list[RayNode]:
        """The alive nodes; raises RuntimeError with a reason."""
        first = self._proc is None
        proc = self._proc or await self._start()
        assert proc.stdin is not None and proc.stdout is not None
        noise = ""
        try:
            proc.stdin.write(f"{timeout_s} {self.gcs_address}\n".encode())
            await proc.stdin.drain()
            async with asyncio.timeout(timeout_s + (NODES_START_S if first else 2.0)):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise RuntimeError(noise or "the query process exited")
                    if line.startswith(_REPLY_PREFIX):
                        break
                    noise = line.decode(errors="replace").strip() or noise  # Ray's own logs
        except (
            OSError,
            ValueError,
            RuntimeError,
            TimeoutError,
        ) as exc:  # ValueError: line > 64 KiB
            await self.close()
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or "broken pipe"
            raise RuntimeError(
                f"asking GCS {self.gcs_address} for nodes failed: {why}"[:300]
            ) from None
        try:
            reply = msgspec.json.decode(line[len(_REPLY_PREFIX) :], type=_NodesReply)
        except msgspec.DecodeError as exc:
            await self.close()
            raise RuntimeError(f"asking GCS {self.gcs_address}: bad reply: {exc}") from None
        if reply.nodes is None:  # a client that failed once starts afresh next time
            await self.close()
            raise RuntimeError(
                f"asking GCS {self.gcs_address} for nodes failed: {reply.error}"[:300]
            )
        return reply.nodes

    async def _start(self) -> asyncio.subprocess.Process:
        python = python_of(self._executable)
        if python is None:
            raise RuntimeError(f"cannot find the Python interpreter of {self._executable!r}")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._prefix,
                python,
                "-c",
                _NODES_SCRIPT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own group: closing kills whatever it started too
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start the GCS query process: {exc.strerror}") from None
        return self._proc

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # else its transport outlives the child and closes on a dead loop
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def alive_ray_nodes(
    executable: str,
    gcs_address: str,
    timeout_s: float = 10.0,
    *,
    argv_prefix: Sequence[str] = (),
) -> list[RayNode]:
    """The nodes GCS reports alive, asked once (a GcsNodes opened and closed). Raises
    RuntimeError with a reason."""
    nodes = GcsNodes(executable, gcs_address, argv_prefix=argv_prefix)
    try:
        return await nodes.alive(timeout_s)
    finally:
        await nodes.close()


def python_of(executable: str) -> str | None:
    """The interpreter of the `ray` console script (its shebang): it can import that Ray."""
    resolved = shutil.which(executable)
    if resolved is None:
        return None
    try:
        with open(resolved, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    return parts[0] if parts and os.path.isabs(parts[0]) else None
