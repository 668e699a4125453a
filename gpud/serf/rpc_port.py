"""Serf's RPC port when another local process holds the configured one.

The RPC port is a loopback port above 1024, so any local user can bind it before serf starts.
Serf's RPC is only ever used by its own gpud, which knows where it listens, so such a squat need
not keep serf down: gpud starts serf's RPC on another loopback port the kernel hands out, names
the squatter in a warning, and never connects to the squatter (the token goes only to a listener
its own serf child holds, see `preflight.rpc_listener`).
"""

from __future__ import annotations

import socket

import msgspec

from gpud.component import Problem
from gpud.config import Config
from gpud.preflight import PortConflict

RPC_FIELD = "serf.rpc_port"


def split_squat(conflicts: list[PortConflict]) -> tuple[PortConflict | None, list[PortConflict]]:
    """(the conflict on serf's RPC port, if any; every other conflict) (pure)."""
    squat = next((c for c in conflicts if c.need.field == RPC_FIELD), None)
    return squat, [c for c in conflicts if c is not squat]


def free_loopback_port() -> int:
    """A loopback TCP port free now (from the kernel's ephemeral range, outside gpud's
    ports range); serf binds it a moment later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_rpc_port(config: Config, port: int) -> Config:
    """``config`` with serf's RPC on ``port`` (what serf's own configuration is built from)."""
    if port == config.serf.rpc_port:
        return config
    return msgspec.structs.replace(config, serf=msgspec.structs.replace(config.serf, rpc_port=port))


def squat_problems(squat: PortConflict | None, moved_to: int) -> list[Problem]:
    """The warning while serf's RPC runs elsewhere because of ``squat`` (pure)."""
    if squat is None:
        return []
    need = squat.need
    holders = ", ".join(
        f"pid {h.pid} (uid {h.uid}, {h.command or '?'})"
        if h.pid is not None
        else f"a process of uid {h.uid} that gpud may not inspect"
        for h in squat.holders
    )
    return [
        Problem(
            code="serf.rpc_port_squatted",
            severity="warning",
            subject=f"{need.port}/{need.proto}",
            message=(
                f"serf RPC port {need.host}:{need.port} ({RPC_FIELD}) is held by "
                f"{holders or 'another process'}; serf's RPC runs on {need.host}:{moved_to} "
                "instead, and that process is never sent serf's token"
            ),
            fix=(
                f"find out why that process holds the port (`ss -lntp 'sport = :{need.port}'`) "
                f"and stop it, or set {RPC_FIELD} to a port no local user holds"
            ),
        )
    ]
