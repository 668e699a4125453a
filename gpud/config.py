"""gpud's configuration: a TOML file decoded into strict, typed msgspec Structs.

Every field has a sane default, so an empty file is a valid configuration. Unknown keys and
wrong types are errors that name the field's path (``ports.block_size``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import shutil
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from gpud.config_messages import field_message
from gpud.errors import ConfigError
from gpud.hostport import is_join_address, is_loopback_host, split_host_port

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
    # --- trust: local authorization ---
    # socket_group may read; changing state (leases, deployments) needs root or this group.
    admin_group: str = "gpud-admin"
    # --- end of local authorization ---


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
    # Ray head, its ring neighbours, failing peers and `random_peers` others in turn around
    # the ring (cost O(k), not O(N); every pair still probed within (N - 3) / k rounds).
    full_mesh_max: Annotated[int, msgspec.Meta(ge=2, le=100_000)] = 8
    random_peers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    # A peer whose gpud refuses connections while Serf sees it alive and its workload's ports
    # answer is "gpud restarting" (a warning) for this long: it keeps its Ray head office and
    # its replicas. Past it, or once the workload stops answering, it is down as any other.
    restart_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0


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
    # The same bounds as the `pri` tag it is gossiped in (gpud.tags.Priority).
    priority: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)] = 0
    num_cpus: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Extra environment for `ray start` (e.g. RAY_* tuning variables).
    env: dict[str, str] = {}
    # How long a candidate collects votes (the Serf query is waited out in full); unset:
    # Serf's default (about 3 s for a few nodes). Shorter means a faster failover.
    vote_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    # Parent of each node's Ray temp dir: Ray's session logs and unix sockets (107-byte paths,
    # so keep it short). Under the state dir, not /tmp: the unit's PrivateTmp= /tmp is deleted
    # whenever gpud stops, and the logs of a crashed Ray with it.
    temp_root: str = "/var/lib/gpud/ray"


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


# ---- metrics (gpud/metrics.py) ----
class MetricsConfig(_Section):
    # Prometheus scrape endpoint, "ip:port" ("[ip6]:port"); "" turns the TCP listener off
    # (the local socket's /metrics still serves the same families). 7949: beside the peer
    # API's 7948, outside the ports range and Linux's ephemeral range.
    listen: str = "0.0.0.0:7949"
    # ---- end metrics ----


# ---- deployments (gpud/deployments/) ----
VLLM_EXECUTABLE = "vllm"


def vllm_executable_check(config: Config) -> str | None:
    """`--check-config`: a warning when the default `vllm` is not on PATH (a host that runs no
    vLLM replica needs none). Raises ConfigError when a configured one cannot be run."""
    value = config.deployments.vllm_executable
    if shutil.which(value) is not None:
        return None
    where = "not on PATH" if os.sep not in value else "not an executable file"
    fix = "set deployments.vllm_executable to the vllm of the Python environment that has Ray"
    if value != VLLM_EXECUTABLE:
        raise ConfigError(f"deployments.vllm_executable: {value!r} is {where}; {fix}")
    return f"deployments.vllm_executable: {value!r} is {where}: vllm replicas cannot run; {fix}"


class DeploymentsConfig(_Section):
    # Operator public keys (base64 Ed25519, from `gpud deploy keygen`): this host runs a spec
    # only if one of them signed it. Keep the list the same on every host.
    operators: list[str] = []
    # Absolute paths a `command` engine's argv[0] may name on this host (exact match).
    command_allow: list[str] = []
    # Replication/placement loop and readiness probes.
    interval_s: PositiveSeconds = 1.0
    probe_timeout_s: PositiveSeconds = 2.0
    # The `vllm` of the Python environment that has Ray (a name is looked up on gpud's PATH,
    # which under the unit is rarely a conda or venv one); `--check-config` checks it.
    vllm_executable: str = VLLM_EXECUTABLE
    # ---- end deployments ----


# ---- router (gpud/router/) ----
class RouterConfig(_Section):
    # The OpenAI-compatible router (every host can run one; clients use any host's).
    enabled: bool = False
    # An IP address of this host ("0.0.0.0": all of them); the port must lie outside the
    # ports range (those are leased to replicas) and differ from gpud's own ports.
    listen: str = "0.0.0.0"
    port: Port = 7950
    # Hashed bearer keys (gpud/router/auth.py). Empty: no authentication.
    api_keys_file: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 16 * 1024 * 1024
    # A connection that sends no complete request header for this long is closed (idle and
    # slow-header clients); a body must arrive within body_timeout_s.
    idle_timeout_s: PositiveSeconds = 30.0
    body_timeout_s: PositiveSeconds = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 1024
    max_connections_per_source: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 256
    # To a replica: connecting, and the longest gap between response bytes.
    connect_timeout_s: PositiveSeconds = 2.0
    read_timeout_s: PositiveSeconds = 600.0
    # Replicas one request may be sent to (only when it provably did not reach one).
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=8)] = 3
    # How often each replica's queue depth is read from its /metrics.
    queue_poll_s: PositiveSeconds = 2.0
    # TLS on the listener (gpud/router/tls.py): a PEM certificate chain and its private key,
    # both or neither. Empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    # ---- end router ----


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
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
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
        raise ConfigError(f"{source}: {field_message(str(exc), data, Config)}") from None
    try:
        return validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_advertise_routable(config: Config) -> None:
    """Peers dial the advertised address: an unspecified or multicast one reaches nobody, and
    a loopback one only this host (fine for a one-host test cluster, never beside peers
    elsewhere)."""
    if config.node.advertise == "auto":
        return
    ip = ipaddress.ip_address(config.node.advertise)
    if ip.is_unspecified or ip.is_multicast:
        raise ConfigError(
            f"node.advertise: {config.node.advertise} is not an address peers can reach; set "
            'this host\'s own address on the cluster network, or "auto"'
        )
    remote = [
        entry for entry in config.serf.retry_join if not is_loopback_host(split_host_port(entry)[0])
    ]
    if ip.is_loopback and remote:
        raise ConfigError(
            f"node.advertise: {config.node.advertise} is a loopback address, which peers such "
            f"as {remote[0]} (serf.retry_join) cannot reach; set this host's own address on "
            'the cluster network, or "auto"'
        )


def validate(config: Config) -> Config:
    """Checks that span fields. Returns the config unchanged or raises ConfigError."""
    if config.node.advertise != "auto":
        try:
            ipaddress.ip_address(config.node.advertise)
        except ValueError:
            raise ConfigError(
                f'node.advertise: {config.node.advertise!r} is neither "auto" nor an IP address'
            ) from None
    _check_ports_range(config.ports)
    _check_node_name(config.node.name)
    for entry in config.serf.retry_join:
        if not is_join_address(entry):
            raise ConfigError(
                f"serf.retry_join: {entry!r} is not host or host:port (host: an IP address or "
                "a DNS name, resolved at each join; port: 1-65535)"
            )
    _check_advertise_routable(config)
    _check_socket_path(config)
    _check_own_ports(config)
    _check_deployments(config.deployments)
    _check_router(config)
    metrics_listen(config)
    return config


def _check_ports_range(ports: PortsConfig) -> None:
    start, end = ports.range_start, ports.range_end
    if start >= end:
        relation = "is greater than" if start > end else "equals"
        raise ConfigError(
            f"ports.range_start = {start} {relation} ports.range_end = {end}; the range runs "
            "from range_start up to (not including) range_end, so range_start must be smaller"
        )
    if end - start < ports.block_size:
        raise ConfigError(
            f"ports.block_size = {ports.block_size}: larger than the ports range {start}-{end} "
            f"({end - start} ports); lower ports.block_size or widen the range"
        )


def own_ports(config: Config) -> dict[str, int]:
    """The ports gpud itself listens on, by key."""
    return {
        "serf.bind_port": config.serf.bind_port,
        "serf.rpc_port": config.serf.rpc_port,
        "peer.port": config.peer.port,
    }


def _check_own_ports(config: Config) -> None:
    start, end = config.ports.range_start, config.ports.range_end
    seen: dict[int, str] = {}
    for key, port in own_ports(config).items():
        if port in seen:
            raise ConfigError(
                f"{key} = {port}: already {seen[port]}; serf.bind_port, serf.rpc_port and "
                "peer.port must all differ"
            )
        seen[port] = key
        if start <= port < end:
            raise ConfigError(
                f"{key} = {port}: inside the ports range {start}-{end} (ports.range_start, "
                "ports.range_end), whose ports are leased to workloads; pick a port outside it"
            )


# An Ed25519 public key, raw (gpud.deployments.authority decodes the same way).
OPERATOR_KEY_BYTES = 32


def _check_deployments(deployments: DeploymentsConfig) -> None:
    for key in deployments.operators:
        try:
            size = len(base64.b64decode(key, validate=True))
        except (binascii.Error, ValueError):
            size = -1
        if size != OPERATOR_KEY_BYTES:
            raise ConfigError(
                f"deployments.operators: {key!r} is not an operator public key (base64 of "
                f"{OPERATOR_KEY_BYTES} bytes: the `public` line of `gpud deploy keygen`)"
            )
    for path in deployments.command_allow:
        if not os.path.isabs(path):
            raise ConfigError(
                f"deployments.command_allow: {path!r} is not an absolute path; a command's "
                "argv[0] must match an entry exactly, so name the file (e.g. /usr/bin/python3)"
            )


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


def metrics_listen(config: Config) -> tuple[str, int] | None:
    """(ip, port) of the metrics listener, None when metrics.listen is "" (pure). Raises
    ConfigError naming the key for anything else that is not an IP and a free port."""
    entry = config.metrics.listen
    if not entry:
        return None
    host, port = split_host_port(entry)
    try:
        ipaddress.ip_address(host)
        number = int(port or "")
        if not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f'metrics.listen: {entry!r} is not ip:port (e.g. "0.0.0.0:7949", "[::]:7949"; '
            '"" turns it off)'
        ) from None
    taken = {
        config.serf.bind_port: "serf.bind_port",
        config.serf.rpc_port: "serf.rpc_port",
        config.peer.port: "peer.port",
    }
    if number in taken:
        raise ConfigError(f"metrics.listen: port {number} is already {taken[number]}")
    if config.ports.range_start <= number < config.ports.range_end:
        raise ConfigError(
            f"metrics.listen: port {number} lies inside the ports range "
            f"{config.ports.range_start}-{config.ports.range_end} (leases hand those out)"
        )
    return host, number


def _check_router(config: Config) -> None:
    router, ports = config.router, config.ports
    if not router.enabled:
        return
    try:
        ipaddress.ip_address(router.listen)
    except ValueError:
        raise ConfigError(
            f"router.listen: {router.listen!r} is not an IP address (0.0.0.0 for all)"
        ) from None
    if ports.range_start <= router.port < ports.range_end:
        raise ConfigError(
            f"router.port: {router.port} lies in the ports range {ports.range_start}-"
            f"{ports.range_end}, whose ports are leased to replicas; pick one outside it"
        )
    taken = {
        config.serf.bind_port: "serf.bind_port",
        config.serf.rpc_port: "serf.rpc_port",
        config.peer.port: "peer.port",
    }
    scrape = metrics_listen(config)
    if scrape is not None:
        taken[scrape[1]] = "the port of metrics.listen"
    if router.port in taken:
        raise ConfigError(f"router.port: {router.port} is already {taken[router.port]}")
    if bool(router.tls_cert) != bool(router.tls_key):
        raise ConfigError("router.tls_cert and router.tls_key: set both (TLS) or neither")


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
