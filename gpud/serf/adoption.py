"""Taking over the serf a previous gpud left running, or stopping it.

Serf outlives gpud (gpud.serf.agent): gpud's exit, graceful or not, leaves it running with no
leave. The next gpud adopts it (`adopt_leftover_serf`) when its recorded leader is that process
(pid, start time, group), runs the command line and configuration this gpud would write (tags
aside), and its RPC listener is that serf's and takes the recorded token (`SERF_RPC`); it then
gossips the tags serf still holds (`restored_tags`) until its components change them. What it
cannot verify it stops (`stop_leftover_serf`).

Here are the records a running serf leaves in the state store for that, the checks, and
serf's command line (`argv`), which must be the one `SerfAgent` (gpud.serf.agent) starts
serf with; the agent writes the records and supervises the adopted serf.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from gpud import log, preflight
from gpud.config import Config
from gpud.errors import ConfigError
from gpud.process_groups import ChildGroup, GroupRecord, leader_verified, runs_argv, stop_leftover
from gpud.secret import cluster_key
from gpud.serf import rpc_port
from gpud.serf.config import serf_binary, serf_config
from gpud.serf.rpc import SerfConnectionError, SerfRPC, SerfRPCError
from gpud.state import Key, open_store
from gpud.tags import Tags

# The running serf's process group, so that a restarted gpud finds one its predecessor left.
SERF_CHILD = Key("serf.child", ChildGroup)


# Where the running serf's RPC listens and the token it takes: what the next gpud connects
# with when it adopts that serf.
class SerfRpc(msgspec.Struct, frozen=True):
    port: int
    token: str


SERF_RPC = Key("serf.rpc", SerfRpc)
# SIGTERM to SIGKILL for such a leftover serf (it exits at once on SIGTERM).
LEFTOVER_GRACE_S = 5.0


def serf_record(config: Config) -> GroupRecord:
    return GroupRecord(open_store(config.state_dir), SERF_CHILD)


def argv(binary_path: str, config_file: Path) -> list[str]:
    """The command line of `serf agent` with ``config_file``: what gpud starts, and what an
    adopted serf must run."""
    return [binary_path, "agent", "-config-file", str(config_file)]


def _generated(
    config: Config, advertise_addr: str, advertise_is_local: bool, tags: Tags, rpc: SerfRpc
) -> dict[str, Any]:
    """Serf's configuration as this gpud writes it for ``rpc`` (raises ConfigError when the
    cluster key cannot be read)."""
    keyed = cluster_key(config) is not None
    serf_dir = config.state_dir / "serf"
    return serf_config(
        rpc_port.with_rpc_port(config, rpc.port),
        node_name=config.node_name,
        advertise_addr=advertise_addr,
        tags=tags,
        rpc_auth=rpc.token,
        keyring_file=str(serf_dir / "keyring.json") if keyed else None,
        snapshot_path=str(serf_dir / "snapshot"),
        advertise_is_local=advertise_is_local,
    )


def config_refusal(written: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str | None:
    """Why a serf started with the configuration ``written`` does not run what this gpud
    would start now (``wanted``), or None: every key alike but the tags, which the running
    serf holds and gpud changes live (pure)."""
    if written is None:
        return "its configuration file cannot be read"
    differ = sorted(
        key
        for key in written.keys() | wanted.keys()
        if key != "tags" and written.get(key) != wanted.get(key)
    )
    return f"its configuration differs ({', '.join(differ)})" if differ else None


def restored_tags(announced: Tags, current: Tags, initial: Tags) -> Tags:
    """The tags to gossip through an adopted serf: what it announces now (``announced``, the
    predecessor's), with every field this gpud's components changed since start (``current``
    against ``initial``) taken from ``current`` (pure)."""
    changed = {
        field: getattr(current, field)
        for field in current.__struct_fields__
        if getattr(current, field) != getattr(initial, field)
    }
    return msgspec.structs.replace(announced, **changed)


class AdoptedSerf(msgspec.Struct, frozen=True):
    """A predecessor's serf, verified: its group and how to reach its RPC."""

    group: ChildGroup
    rpc: SerfRpc


async def adopt_leftover_serf(
    config: Config, advertise_addr: str, advertise_is_local: bool
) -> AdoptedSerf | None:
    """The serf a previous gpud left running on this node when it verifies (module
    docstring); None otherwise (then `stop_leftover_serf` stops it)."""
    store = open_store(config.state_dir)
    group = serf_record(config).load()
    rpc = store.get(SERF_RPC)
    path = serf_binary(config.serf.binary)
    config_file = config.state_dir / "serf" / "serf.json"
    if group is None or rpc is None:
        return None
    refused = (
        "its recorded leader is not that process" if not leader_verified(group)
        else "no serf executable" if path is None
        else "another command line" if not runs_argv(group.pgid, argv(path, config_file))
        else preflight.rpc_listener(rpc.port, group.pgid) != "ours"
        and "its RPC port is not its own listener"
    )  # fmt: skip
    if not refused:
        try:
            written = json.loads(config_file.read_text())
        except (OSError, ValueError):
            written = None
        try:
            wanted = _generated(config, advertise_addr, advertise_is_local, Tags(), rpc)
            refused = config_refusal(written, wanted)
        except ConfigError as exc:
            refused = str(exc)
    if not refused:
        try:
            probe = await SerfRPC.connect("127.0.0.1", rpc.port, rpc.token)
            await probe.close()
        except (SerfConnectionError, SerfRPCError) as exc:
            refused = f"its RPC does not take the recorded token: {exc}"
    if refused:
        log.info(log.get("serf"), "not adopting serf", pid=group.pgid, reason=str(refused))
        return None
    return AdoptedSerf(group=group, rpc=rpc)


async def stop_leftover_serf(config: Config) -> None:
    """Stop the serf a kill -9'd gpud left running on this node (its recorded group, nothing
    else): it holds the ports the agent's preflight checks, and its RPC token died with that
    gpud."""
    await stop_leftover(serf_record(config), LEFTOVER_GRACE_S)
