"""The compact, versioned summary every node gossips in its Serf tags.

Serf tags are a string-to-string map, and memberlist allows 512 bytes for all of one member's
tags together, so keys are short and details live behind the peer API. A member whose tags are
malformed or of an unknown version is shown as such; decoding never raises.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgpack
import msgspec

from gpud.errors import GpudError

TAGS_VERSION = 1
# memberlist's limit on a node's meta (Serf encodes the tag map into it with msgpack).
MAX_TAGS_BYTES = 512

RayRole = Literal["none", "head", "worker"]
HealthSummary = Literal["unknown", "passing", "warning", "critical"]
GpuHealthSummary = Literal["unknown", "healthy", "degraded", "unhealthy"]
HeadPreference = Literal["auto", "prefer", "never"]
GcsReachSummary = Literal["unknown", "ok", "fail"]

# Every field is bounded here, in the schema, because a cluster-key holder can gossip any
# string: a value out of range must be a tags error at decode, never an OverflowError or a
# huge number deep inside a probe, a connect or the election.
# A TCP port, or 0 for "none announced".
PortOrNone = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# Election terms grow by one per election round; 2**62 leaves room for +1 in SQLite's int64.
Term = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
# A block index (-1: unclaimed); 65535 blocks is more than any port space can hold.
BlockIndex = Annotated[int, msgspec.Meta(ge=-1, le=65535)]
# Unix seconds (0: unset); 2**40 s is some 34,000 years away.
UnixSeconds = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
GpuCount = Annotated[int, msgspec.Meta(ge=0, le=4096)]
# ray.priority in the config has the same bounds.
Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Role = Annotated[str, msgspec.Meta(min_length=1, max_length=16, pattern=r"^[a-z]+$")]
# gpud.deployments.store.set_digest: a short hex digest, empty without records.
RecordsDigest = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9a-f]*$")]
# gpud.deployments.claims: "name.index:port:digest[:gcs[:flags[:nm]]]", ";"-separated, ASCII only
# (so int() of a digit run never meets a non-ASCII digit).
_CLAIM = (
    r"[a-z0-9-]{1,63}\.[0-9]{1,4}:[0-9]{1,5}:[0-9a-f]{0,32}"
    r"(?::[0-9]{0,5}(?::[a-z]{0,8}(?::[0-9]{0,5})?)?)?"
)
ReplicaClaims = Annotated[
    str, msgspec.Meta(max_length=MAX_TAGS_BYTES, pattern=rf"^(?:{_CLAIM}(?:;{_CLAIM})*)?$")
]
# What this node's own claims may take when it gossips them: the rest of the 512 bytes once
# every other field is at its longest (some 290 bytes today), with room for a few more fields.
# So the tags fit whatever a node runs (tests/core/test_tags_budget.py builds that worst case from
# the schema); the deployments publisher leaves out the claims past it, heads' first. Peers
# still decode up to 512 characters (what older nodes may gossip).
CLAIMS_MAX_CHARS = 200


class Tags(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    v: int = TAGS_VERSION
    # gpud's role in the cluster (always "gpud" today; room for "gateway" etc.).
    role: Role = "gpud"
    # Peer API port on the advertised address.
    pp: PortOrNone = 0
    # Claimed port block (index into the cluster port space); -1 while unclaimed.
    blk: BlockIndex = -1
    # When the block claim was confirmed (unix seconds; 0 while unconfirmed). Between two
    # confirmed claims of one block on one host address the earlier one wins.
    bc: UnixSeconds = 0
    # Number of GPUs NVML reports.
    gpu: GpuCount = 0
    # -- deployments (gpud/deployments/service.py): digest of the node's spec records (peers
    # whose digest differs fetch them over the peer API), and the replicas it runs with their
    # ports ("web.0:20001;web.1:20005").
    dv: RecordsDigest = ""
    dp: ReplicaClaims = ""
    # -- end deployments
    # Ray: role, election term, GCS port once the head's GCS answers (0: not ready).
    ray: RayRole = "none"
    term: Term = 0
    gcs: PortOrNone = 0
    # Head eligibility inputs: preference, priority, Ray installed, behind NAT.
    rh: HeadPreference = "auto"
    pri: Priority = 0
    rv: bool = False
    nat: bool = False
    # This node's own health summary.
    hl: HealthSummary = "unknown"
    # The node's GPU verdict; an unhealthy node is never Ray head.
    gh: GpuHealthSummary = "unknown"
    # Ray worker only: its node-manager port (the head probes it when the worker is missing
    # from its GCS), and whether it reaches the GCS of the head of its term (the election
    # deposes a head whose GCS a majority of its workers cannot reach).
    nm: PortOrNone = 0
    hg: GcsReachSummary = "unknown"
    # A head that stepped down because a majority of its workers could not reach its GCS:
    # that GCS port (0: none). While set it runs Ray as a worker but is never head, and its
    # peers probe the port to tell whether the path to it is still blocked.
    hc: PortOrNone = 0
    # Those peers' verdict on that port (ok: it answers again, which ends the cool-down).
    hx: GcsReachSummary = "unknown"
    # Cordoned (`gpud drain`): no new replicas here, never Ray head; survives restarts.
    cd: bool = False


_DEFAULTS = Tags()


class TagsError(ValueError, GpudError):
    """Tags that cannot be gossiped (too large) or decoded."""


def encode(tags: Tags) -> dict[str, str]:
    """Tags as Serf's string map; raises TagsError above memberlist's 512-byte limit, for
    claims past CLAIMS_MAX_CHARS or for a field out of its bounds."""
    # Defaults are left out of the gossip (memberlist meta is small); decode restores them.
    defaults = msgspec.to_builtins(_DEFAULTS)
    raw = {
        key: ("1" if value is True else "0" if value is False else str(value))
        for key, value in msgspec.to_builtins(tags).items()
        if value != defaults[key]
    }
    raw["v"] = str(tags.v)
    if len(tags.dp) > CLAIMS_MAX_CHARS:
        raise TagsError(
            f"replica claims take {len(tags.dp)} characters, more than the {CLAIMS_MAX_CHARS} "
            "the tags keep for them"
        )
    size = len(msgpack.packb(raw))
    if size > MAX_TAGS_BYTES:
        raise TagsError(f"tags take {size} bytes, more than memberlist's {MAX_TAGS_BYTES}")
    # Gossip nothing peers would refuse to decode (a field out of its schema's bounds).
    decode(raw)
    return raw


def decode(raw: dict[str, str]) -> Tags:
    """Decode a member's tag map; raises TagsError with a short reason."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise TagsError("tags are not a string map")
    if "v" not in raw:
        raise TagsError("no tag protocol version (not a gpud node?)")
    if raw["v"] != str(TAGS_VERSION):
        raise TagsError(f"unknown tag protocol version {raw['v'][:16]!r}")
    try:
        return msgspec.convert(raw, Tags, strict=False)
    except msgspec.ValidationError as exc:
        raise TagsError(f"malformed tags: {exc}") from None
    except UnicodeError:  # a lone surrogate cannot be UTF-8 (msgpack can hand them through)
        raise TagsError("malformed tags: not valid UTF-8") from None
