"""Schemas shared by the daemon, the CLI and the peer API (msgspec only: the CLI starts fast)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gpud.deployments.version import Record, SpecVersion

# base64 of a raw Ed25519 public key (32 bytes) or signature (64 bytes).
B64 = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z0-9+/=]*$")]


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """A record as stored and replicated: the record plus the operator's signature of its spec.

    The signature covers `spec.encode(record.spec)` (the canonical JSON), so it travels through
    any number of nodes unchanged; a node runs the spec only if `operator` is one of its
    trusted keys and the signature verifies. A tombstone's signature covers its name and
    version (`authority.delete_message`); nodes with operators configured apply only signed
    tombstones.
    """

    record: Record
    operator: B64 = ""
    signature: B64 = ""


class ApplyRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/deployments as JSON (a raw TOML body is accepted too, unsigned or with
    the X-Gpud-Operator / X-Gpud-Signature headers)."""

    spec: Annotated[str, msgspec.Meta(max_length=64 * 1024)]
    operator: B64 = ""
    signature: B64 = ""


class DeleteRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of DELETE /v1/deployments/NAME for a signed delete: the tombstone's version (the
    CLI picks one after the node's Lamport clock) and an operator's signature of it."""

    version: SpecVersion
    operator: B64
    signature: B64


class PeerRecordsRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


class PeerRecordsReply(msgspec.Struct, kw_only=True):
    name: str
    digest: str
    entries: list[Entry]


class PeerProbesRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ProbeReport(msgspec.Struct, frozen=True, kw_only=True):
    """A node's latest probe of a replica's health path over the data path."""

    deployment: str
    replica: int
    node: str
    port: int
    ok: bool


class PeerProbesReply(msgspec.Struct, kw_only=True):
    """What a peer's probes say: a replica's head asks before it announces itself ready."""

    name: str
    probes: list[ProbeReport]


ReplicaState = Literal["pending", "starting", "ready", "failed", "refused"]


class ReplicaView(msgspec.Struct, kw_only=True):
    index: int
    state: ReplicaState
    # Empty while pending.
    node: str = ""
    addr: str = ""
    port: int = 0
    # Every node of the replica (the head, `node`, runs the server; N > 1: one Ray cluster).
    nodes: list[str] = []
    # N > 1, on a node of the replica: its Ray node's pid, restarts and last error.
    ray_pid: int | None = None
    ray_restarts: int = 0
    ray_error: str = ""
    # GPU UUIDs and process details: known only on the node that runs the replica.
    gpus: list[str] = []
    pid: int | None = None
    restarts: int = 0
    last_error: str = ""
    # On the node that runs its server, while no probe passed since its latest start: seconds
    # since that start, and how long it may take (the spec's startup_timeout_s).
    starting_s: float | None = None
    startup_timeout_s: int = 0
    # Why it is pending, refused or failed.
    reason: str = ""
    # Leading hex digits of the digest of the spec this replica runs (differs from the
    # deployment's digest while a spec change rolls).
    spec: str = ""
    # This node's last probe of the health path over the data path (None: not probed yet).
    probe_ok: bool | None = None
    probe_error: str = ""
    # What the replica's head announces in its tags: a peer's data-path probe of it passed.
    announced_ready: bool = False


class DeploymentView(msgspec.Struct, kw_only=True):
    name: str
    version: str
    origin: str
    digest: str
    engine: str
    model: str
    replicas: int
    nodes_per_replica: int
    gpus_per_node: int
    health_path: str
    # "active", or "refused" with the reason (unsigned, untrusted operator, not allowed here).
    state: Literal["active", "refused"]
    reason: str = ""
    # A delete this node refused (unsigned or wrongly signed while operators are configured).
    delete_refused: str = ""
    operator: str = ""
    replica_views: list[ReplicaView] = []


class DeploymentsList(msgspec.Struct, kw_only=True):
    node: str
    digest: str
    lamport: int
    deployments: list[DeploymentView]
    # Names deleted (tombstones), for `gpud deploy list --json`.
    deleted: list[str] = []


class Endpoint(msgspec.Struct, kw_only=True):
    replica: int
    node: str
    addr: str
    port: int
    url: str


class EndpointsReply(msgspec.Struct, kw_only=True):
    name: str
    endpoints: list[Endpoint]


class TargetGroup(msgspec.Struct, kw_only=True):
    """One Prometheus file_sd target group."""

    targets: list[str]
    labels: dict[str, str]


class ApplyReply(msgspec.Struct, kw_only=True):
    name: str
    version: str
    digest: str
    changed: bool


class SectionStatus(msgspec.Struct, kw_only=True):
    """The deployments section of `gpud status` and /v1/status."""

    digest: str
    lamport: int
    deployments: int
    running_here: int
    pending: int
    # Nodes placement may use right now (alive, health passing, verified, with a GPU verdict):
    # fewer than the members means replicas cannot spread to the rest yet.
    placeable_nodes: int = 0
    fetch_errors: dict[str, str] = {}
    # `gpud drain`: no new replicas here; those here move elsewhere make-before-break.
    cordoned: bool = False
    # Old copies here serving until their new copy elsewhere is ready.
    draining: int = 0
