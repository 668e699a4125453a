"""gpud's configuration: a TOML file decoded into strict, typed msgspec Structs.

Every field has a sane default, so an empty file is a valid configuration. Unknown keys and
wrong types are errors that name the field's path (``ports.block_size``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from gpud.errors import ConfigError

DEFAULT_PATH = "/etc/gpud/gpud.toml"
ENV_VAR = "GPUD_CONFIG"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NodeConfig(_Section):
    # Node name in the cluster; must be unique. Empty: the host name.
    name: str = ""
    # "auto" (address of `interface`, or of the interface holding the default route) or an IP.
    advertise: str = "auto"
    # Interface to take the address from with advertise = "auto"; empty: default-route interface.
    interface: str = ""


class ClusterConfig(_Section):
    name: str = "gpud"
    # File holding the cluster secret (base64, from `gpud keygen`). It encrypts gossip and
    # derives the key that authenticates the peer API. Empty: no encryption (test clusters only).
    key_file: str = ""
    # Consent to run without key_file (a test cluster): without it an unkeyed node reports a
    # critical problem (serf.unencrypted) and never runs Ray.
    insecure: bool = False


class SerfConfig(_Section):
    # The `serf` executable. Empty: the one the package bundles (/usr/libexec/gpud/serf),
    # else `serf` on PATH.
    binary: str = ""
    # Not serf's own defaults (7946, also Docker Swarm's gossip port, and 7373), so that a
    # stand-alone serf or a Swarm node on the same host never fights gpud's serf.
    bind_port: Port = 7951
    # Serf RPC listens on 127.0.0.1 only, with a fresh random auth token each start.
    rpc_port: Port = 7374
    # Addresses ("ip" or "ip:port"; without a port, bind_port) to join at start and to retry.
    retry_join: list[str] = []
    retry_interval_s: PositiveSeconds = 5.0
    # Seconds to wait for a graceful leave on shutdown.
    leave_timeout_s: PositiveSeconds = 5.0


class ApiConfig(_Section):
    # Local API: HTTP over a Unix socket. Empty: <paths.runtime_dir>/gpud.sock.
    socket: str = ""
    socket_group: str = "gpud"
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    # --- issue 10 (trust): local authorization ---
    # socket_group may read; changing state (leases, deployments) needs root or this group.
    admin_group: str = "gpud-admin"
    # --- end issue 10 ---


class PathsConfig(_Section):
    state_dir: str = "/var/lib/gpud"
    runtime_dir: str = "/run/gpud"


class PeerConfig(_Section):
    # Peer API (other gpuds only) on the advertised address.
    port: Port = 7948


class HealthConfig(_Section):
    interval_s: PositiveSeconds = 2.0
    timeout_s: PositiveSeconds = 1.0
    failures_before_critical: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    successes_before_passing: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    # Probes in flight at once.
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    # Up to this many members every node probes every peer; above it, each round probes the
    # Ray head, its ring neighbours and `random_peers` random peers (cost O(k), not O(N)).
    full_mesh_max: Annotated[int, msgspec.Meta(ge=2, le=100_000)] = 32
    random_peers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3


class PortsConfig(_Section):
    # Cluster port space [range_start, range_end), cut into blocks of block_size ports.
    # Default stays below Linux's ephemeral range (32768-60999).
    range_start: Port = 20000
    range_end: Port = 32000
    block_size: Annotated[int, msgspec.Meta(ge=8, le=16384)] = 400
    # Add the block to net.ipv4.ip_local_reserved_ports so the kernel never uses it ephemerally.
    reserve: bool = True
    # Seconds a lease whose owner pid is gone is kept before the zombie scan reclaims it.
    zombie_grace_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 10.0
    # Seconds to let gossip settle before a block claim is confirmed.
    settle_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 3.0


class RayConfig(_Section):
    enabled: bool = True
    # The `ray` executable of the CUDA stack's Python environment.
    executable: str = "ray"
    # "auto": may be elected; "prefer": preferred over "auto" nodes; "never": always a worker.
    head: Literal["auto", "prefer", "never"] = "auto"
    priority: int = 0
    num_cpus: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Extra environment for `ray start` (e.g. RAY_* tuning variables).
    env: dict[str, str] = {}
    # How long a candidate collects votes (the Serf query is waited out in full); unset:
    # Serf's default (about 3 s for a few nodes). Shorter means a faster failover.
    vote_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    # Parent of each node's Ray temp dir; Ray's unix socket paths live under it (107 bytes).
    temp_root: str = "/tmp/gpud-ray"


# ---- gpus (GPU health, gpud/gpus/) ----
class GpusConfig(_Section):
    # Module that provides NVML (nvidia-ml-py's "pynvml"; tests name a fake one).
    nvml_module: str = "pynvml"
    poll_interval_s: PositiveSeconds = 10.0
    # An NVML call that has not answered after this long makes the GPUs' verdict "unknown".
    nvml_timeout_s: PositiveSeconds = 10.0
    # Kernel log to follow for NVRM Xid lines; sysfs PCI devices to count NVIDIA GPUs in.
    kmsg_path: str = "/dev/kmsg"
    pci_root: str = "/sys/bus/pci/devices"
    # Hysteresis: polls a new, worse (or better) verdict must persist before it is taken.
    # Lost GPUs, uncorrectable ECC and XIDs count at once.
    polls_before_worse: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    polls_before_better: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # How long an XID counts toward the verdict.
    xid_window_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
    # Degraded when the temperature is within this many degrees of the slowdown threshold.
    temperature_margin_c: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    # Degraded above this power draw relative to the enforced limit.
    power_limit_ratio: Annotated[float, msgspec.Meta(gt=0, le=10)] = 1.05
    # Aggregate (lifetime) uncorrected ECC errors above which the GPU needs an inspection.
    ecc_aggregate_uncorrected_max: Annotated[int, msgspec.Meta(ge=0)] = 10
    # Retired pages (pre-Ampere) at which NVIDIA recommends an RMA.
    retired_pages_max: Annotated[int, msgspec.Meta(ge=1)] = 60
    # PCIe replays / NVLink errors per poll above which the link is degraded.
    pcie_replay_growth_max: Annotated[int, msgspec.Meta(ge=0)] = 100
    nvlink_error_growth_max: Annotated[int, msgspec.Meta(ge=0)] = 100
    # Seconds a GPU lease whose owner pid is gone is kept before it is reclaimed.
    zombie_grace_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 10.0
    # ---- end gpus ----


# ---- deployments (gpud/deployments/) ----
class DeploymentsConfig(_Section):
    # Operator public keys (base64 Ed25519, from `gpud deploy keygen`): this host runs a spec
    # only if one of them signed it. Keep the list the same on every host.
    operators: list[str] = []
    # Absolute paths a `command` engine's argv[0] may name on this host (exact match).
    command_allow: list[str] = []
    # Replication/placement loop and readiness probes.
    interval_s: PositiveSeconds = 1.0
    probe_timeout_s: PositiveSeconds = 2.0
    # ---- end deployments ----


class Config(_Section):
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    serf: SerfConfig = msgspec.field(default_factory=SerfConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    peer: PeerConfig = msgspec.field(default_factory=PeerConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    ports: PortsConfig = msgspec.field(default_factory=PortsConfig)
    ray: RayConfig = msgspec.field(default_factory=RayConfig)
    gpus: GpusConfig = msgspec.field(default_factory=GpusConfig)  # gpus: gpud/gpus/
    deployments: DeploymentsConfig = msgspec.field(default_factory=DeploymentsConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname()

    @property
    def socket_path(self) -> str:
        return self.api.socket or os.path.join(self.paths.runtime_dir, "gpud.sock")

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)


def config_path(explicit: str | None) -> str:
    """--config wins, then $GPUD_CONFIG, then the default path."""
    return explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str, *, missing_ok: bool = False) -> Config:
    """Read and validate ``path``. Raises ConfigError with a one-line message."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return validate(Config())
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse(raw, source=path)


def parse(raw: bytes | str, *, source: str = "<config>") -> Config:
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 (byte {exc.start}): save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_field_message(str(exc))}") from None
    try:
        return validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _field_message(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.ports.block_size`"; lead with the field.
    text, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{where.rstrip('`')}: {text}"


def validate(config: Config) -> Config:
    """Checks that span fields. Returns the config unchanged or raises ConfigError."""
    if config.node.advertise != "auto":
        try:
            ipaddress.ip_address(config.node.advertise)
        except ValueError:
            raise ConfigError(
                f'node.advertise: {config.node.advertise!r} is neither "auto" nor an IP address'
            ) from None
    ports = config.ports
    if ports.range_end - ports.range_start < ports.block_size:
        raise ConfigError(
            f"ports: range {ports.range_start}-{ports.range_end} is smaller than one block "
            f"({ports.block_size} ports)"
        )
    _check_node_name(config.node.name)
    for entry in config.serf.retry_join:
        host, port = split_host_port(entry)
        try:
            ipaddress.ip_address(host)
            if port is not None and not 1 <= int(port) <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"serf.retry_join: {entry!r} is not an address or address:port (port 1-65535)"
            ) from None
    _check_socket_path(config)
    own = {config.serf.bind_port, config.serf.rpc_port, config.peer.port}
    if len(own) != 3:
        raise ConfigError("serf.bind_port, serf.rpc_port and peer.port must all differ")
    if any(ports.range_start <= p < ports.range_end for p in own):
        raise ConfigError("serf and peer ports must lie outside the ports range")
    return config


# Serf and the peer API carry node names; these are what both accept, kept short for tags.
NODE_NAME_MAX = 128
# sockaddr_un.sun_path: 108 bytes including the terminating NUL.
SOCKET_PATH_MAX = 107


UNENCRYPTED = "gossip is unencrypted and anyone on the network can join and become Ray head"


def unkeyed_refusal(config: Config) -> str | None:
    """Why this node must not act on gossip as a cluster (run Ray): no cluster key and no
    explicit cluster.insecure = true (pure). None: keyed, or a consenting test cluster."""
    if config.cluster.key_file or config.cluster.insecure:
        return None
    return f"{UNENCRYPTED} (no cluster.key_file, and cluster.insecure is not set)"


def split_host_port(entry: str) -> tuple[str, str | None]:
    """("10.0.0.1", "7951") from "10.0.0.1:7951", ("::1", None) from "::1" or "[::1]" (pure)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None


def _check_node_name(name: str) -> None:
    if not name:
        return  # the host name
    if len(name) > NODE_NAME_MAX:
        raise ConfigError(f"node.name: longer than {NODE_NAME_MAX} characters")
    bad = [c for c in name if not (c.isascii() and (c.isalnum() or c in "-_."))]
    if bad:
        raise ConfigError(
            f"node.name: {name!r} contains {bad[0]!r}; use letters, digits, '-', '_' and '.'"
        )


def _check_socket_path(config: Config) -> None:
    path = config.socket_path
    field = "api.socket" if config.api.socket else "paths.runtime_dir"
    if len(path.encode()) > SOCKET_PATH_MAX:
        raise ConfigError(
            f"{field}: socket path {path!r} is {len(path.encode())} bytes; a Unix socket path "
            f"has at most {SOCKET_PATH_MAX}"
        )
    resolved = Path(os.path.abspath(path))
    for pseudo in ("/proc", "/sys", "/dev"):
        if resolved.is_relative_to(pseudo):
            raise ConfigError(
                f"{field}: socket path {path!r} is under {pseudo}, which holds no sockets"
            )


def check_host(config: Config) -> Config:
    """What only this host can tell (``gpud agent`` and ``--check-config``, not client
    commands): the state dir can be a directory, the cluster key is readable and valid."""
    state = config.state_dir
    for parent in (state, *state.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"paths.state_dir: {parent} exists and is not a directory")
            break
    sock = Path(config.socket_path)
    if (sock.exists() or sock.is_symlink()) and (sock.is_symlink() or not sock.is_socket()):
        raise ConfigError(
            f"{'api.socket' if config.api.socket else 'paths.runtime_dir'}: {sock} exists and is "
            "not a socket; gpud will not replace it"
        )
    from gpud.secret import cluster_key  # secret imports this module

    try:
        cluster_key(config)
    except UnicodeDecodeError:
        raise ConfigError(
            f"cluster.key_file {config.cluster.key_file}: not base64 text (`gpud keygen`)"
        ) from None
    return config


def key_file_mode_warning(
    path: str,
    mode: int,
    group: str,
    group_members: list[str],
    operator_groups: set[str],
    service_users: set[str],
) -> str | None:
    """Why the cluster key file is readable by more than root and the service (pure): by
    every user, or by a group that operators are in (the socket or admin group, or one with
    members besides the service). None: only root and the service can read it."""
    if mode & 0o004:
        return f"cluster.key_file {path} is readable by every user (mode {mode & 0o777:04o})"
    if not mode & 0o040:
        return None
    others = sorted(set(group_members) - service_users)
    if group in operator_groups or others:
        who = f"members {', '.join(others)}" if others else "the operators of the local API"
        return (
            f"cluster.key_file {path} is readable by group {group} (mode {mode & 0o777:04o}), "
            f"which holds {who}: they can join the cluster and become Ray head"
        )
    return None


def host_warnings(config: Config) -> list[str]:
    """What this host's setup risks without being wrong (``--check-config`` prints them, the
    agent reports them as problems): a cluster key readable beyond root and the service."""
    import grp
    import pwd

    path = config.cluster.key_file
    if not path:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return []  # check_host reports an unreadable key
    try:
        entry = grp.getgrgid(st.st_gid)
        group, members = entry.gr_name, list(entry.gr_mem)
    except KeyError:
        group, members = str(st.st_gid), []
    try:
        running = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        running = ""
    warning = key_file_mode_warning(
        path,
        st.st_mode,
        group,
        members,
        operator_groups={config.api.socket_group, config.api.admin_group},
        service_users={"root", "gpud", running},
    )
    return [warning] if warning else []


# What `systemctl reload gpud` (SIGHUP) applies without a restart; every other change waits
# for one (a restart is a leave and a rejoin, so reload avoids it where it can).
LIVE_FIELDS = ("log_level", "health", "serf.retry_join", "ray.priority")


class ReloadPlan(msgspec.Struct, frozen=True, kw_only=True):
    # The config to run with now: the old one with the live fields taken from the new one.
    config: Config
    live: list[str]  # changed fields applied now
    restart: list[str]  # changed fields that wait for `systemctl restart gpud`


def changed_fields(old: msgspec.Struct, new: msgspec.Struct, prefix: str = "") -> list[str]:
    """Dotted paths of the leaf fields that differ between ``old`` and ``new`` (pure)."""
    changed: list[str] = []
    for field in msgspec.structs.fields(old):
        a, b = getattr(old, field.name), getattr(new, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            changed += changed_fields(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed


def _is_live(path: str) -> bool:
    return any(path == live or path.startswith(f"{live}.") for live in LIVE_FIELDS)


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """What a reload from ``old`` to ``new`` does (pure)."""
    changed = changed_fields(old, new)
    merged = msgspec.structs.replace(
        old,
        log_level=new.log_level,
        health=new.health,
        serf=msgspec.structs.replace(old.serf, retry_join=new.serf.retry_join),
        ray=msgspec.structs.replace(old.ray, priority=new.ray.priority),
    )
    return ReloadPlan(
        config=merged,
        live=[p for p in changed if _is_live(p)],
        restart=[p for p in changed if not _is_live(p)],
    )
