"""Pure decisions of the health component: hysteresis per direction, the verdict for each pair
(us <-> peer) with a reason an operator can act on, NAT detection and the node's own verdict.

No I/O here; the prober feeds in results and the service publishes what comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from gpud.component import Severity
from gpud.context import MemberStatus
from gpud.netprobe import ProbeCause

DirectionState = Literal["unknown", "passing", "critical"]
HealthState = Literal["unknown", "passing", "warning", "critical"]
HEALTH_STATES: tuple[HealthState, ...] = ("unknown", "passing", "warning", "critical")
PairKind = Literal[
    "unknown",  # not enough results yet
    "ok",  # both directions pass
    "out-failing",  # peer reaches us, we cannot reach it
    "in-failing",  # we reach the peer, it cannot reach us
    "data-path",  # Serf sees the peer alive but the data path fails both ways
    "down",  # Serf marks it failed and probes fail
    "gossip-failing",  # the data path works but Serf marks the peer failed
    "restarting",  # its gpud refuses, its workload answers: within the restart grace
]


class WorkloadCheck(msgspec.Struct, kw_only=True, frozen=True):
    """A data-path check of the workload's own ports (a Ray GCS, a Ray node manager), judged
    with the same hysteresis as gpud's peer checks and shown beside them in /v1/health: gpud's
    own port answering says nothing about the workload's (seed 001)."""

    check: str  # what is checked, e.g. "ray.gcs" (this worker -> its head's GCS)
    subject: str  # the node whose port it is
    target: str  # host:port probed, or the GCS asked
    state: DirectionState
    reason: str = ""


class Thresholds(msgspec.Struct, frozen=True):
    failures_before_critical: int
    successes_before_passing: int


class Direction(msgspec.Struct, frozen=True):
    """Hysteresis state of one direction of one pair."""

    state: DirectionState = "unknown"
    ok_streak: int = 0
    fail_streak: int = 0
    # The last failure's cause while the last result was a failure, else "".
    reason: str = ""
    # That cause as a code (None while passing, or for checks that are no connect).
    cause: ProbeCause | None = None


def step(
    direction: Direction,
    ok: bool,
    reason: str,
    thresholds: Thresholds,
    cause: ProbeCause | None = None,
) -> Direction:
    """Add one probe result (``cause``: a failed probe's, gpud.netprobe.ProbeOutcome.cause).
    The state changes only when the run of consecutive equal results reaches its threshold,
    so one lost packet never flips a verdict."""
    if ok:
        streak = direction.ok_streak + 1
        flip = streak >= thresholds.successes_before_passing
        return Direction(
            state="passing" if flip else direction.state, ok_streak=streak, fail_streak=0
        )
    streak = direction.fail_streak + 1
    flip = streak >= thresholds.failures_before_critical
    return Direction(
        state="critical" if flip else direction.state,
        ok_streak=0,
        fail_streak=streak,
        reason=reason,
        cause=cause,
    )


class Endpoint(msgspec.Struct, frozen=True):
    name: str
    addr: str
    port: int

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}"


class PairVerdict(msgspec.Struct, frozen=True):
    state: HealthState
    kind: PairKind
    message: str
    # What to do about it ("" when nothing is wrong).
    fix: str = ""


def judge_pair(
    us: Endpoint,
    peer: Endpoint,
    serf: MemberStatus,
    out: Direction,
    inbound: Direction,
    *,
    peer_nat: bool = False,
) -> PairVerdict:
    """Verdict for one pair from our probes (out), the evidence that the peer reaches us (in)
    and Serf's status of the peer; the two directions are judged separately. ``peer_nat``: the
    peer's own tags say it is behind NAT (its advertised address may not be routable).

    A direction counts as cleanly passing only while its latest result passed: a peer that just
    died still has a passing in-direction for a round or two, and must not look one-way."""
    name = peer.name
    out_bad, in_bad = out.state == "critical", inbound.state == "critical"
    out_ok, in_ok = out.state == "passing", inbound.state == "passing"
    in_still_ok = in_ok and inbound.fail_streak == 0
    serf_failed = serf == "failed"
    if out_bad and peer_nat:
        # Its address is private: no firewall rule or restart here can make it reachable.
        return PairVerdict(
            "warning" if in_still_ok else "critical",
            "out-failing" if in_still_ok else ("down" if serf_failed else "data-path"),
            f"{name} advertises a private address that is not reachable from here and reports "
            f"itself behind NAT: run it with host networking ({peer} {out.reason})",
            f"run gpud and Ray on {name} with host networking (docker run --network host), or "
            "map every port 1:1 and set node.advertise on it to an address peers reach",
        )
    if out_bad and not in_still_ok:
        if serf_failed:
            return PairVerdict(
                "critical",
                "down",
                f"{name} is down: Serf marks it failed and {peer} does not answer ({out.reason})",
                f"check that the host {peer.addr} is up and gpud runs on it (systemctl status gpud)",
            )
        seen = f"Serf sees {name} alive (its gossip port works) but its peer API {peer}"
        back = f", and {name} cannot reach us either ({inbound.reason})" if in_bad else ""
        cause = out.cause
        if cause == "refused":
            return PairVerdict(
                "critical",
                "data-path",
                f"gpud is not running on {name}: {seen} refuses connections ({out.reason}){back}",
                f"start gpud on {name} (systemctl start gpud; journalctl -u gpud says why it "
                f"stopped); if it runs, a firewall on {peer.addr} rejects TCP {peer.port}",
            )
        if cause == "timeout":
            return PairVerdict(
                "critical",
                "data-path",
                f"gpud on {name} is hung or a firewall drops: {seen} does not answer "
                f"({out.reason}){back}",
                f"on {name} check that gpud is not stopped or overloaded (systemctl status "
                f"gpud); if it is fine, open TCP {peer.port} and the Ray ports between "
                f"{us.addr} and {peer.addr}",
            )
        return PairVerdict(
            "critical",
            "data-path",
            f"{seen} does not answer ({out.reason}){back}",
            f"a firewall passes gossip but blocks other ports: open TCP {peer.port} and the Ray "
            f"ports between {us.addr} and {peer.addr}",
        )
    if out_bad:
        return PairVerdict(
            "warning",
            "out-failing",
            f"{peer.addr} reaches us but we cannot reach {peer} ({out.reason}) — a firewall on "
            f"{peer.addr} or a one-way NAT",
            f"allow inbound TCP {peer.port} (and the Ray ports) on {peer.addr} from {us.addr}",
        )
    if in_bad and out_ok:
        return PairVerdict(
            "warning",
            "in-failing",
            f"we reach {peer} but {peer.addr} cannot reach us at {us} ({inbound.reason}) — a "
            f"firewall on this host ({us.addr}) or NAT in front of it",
            f"allow inbound TCP {us.port} (and the Ray ports) on {us.addr} from {peer.addr}; "
            "behind NAT use host networking",
        )
    if out_ok and in_ok:
        if serf_failed:
            return PairVerdict(
                "warning",
                "gossip-failing",
                f"Serf marks {name} failed but its data path answers both ways — its gossip "
                "port is blocked or it is overloaded",
                f"allow the Serf port (TCP and UDP) between {us.addr} and {peer.addr}",
            )
        return PairVerdict("passing", "ok", f"{name} reachable both ways")
    return PairVerdict("unknown", "unknown", f"{name}: not enough probe results yet")


def restarting_verdict(peer: Endpoint, grace_s: float) -> PairVerdict:
    """The pair verdict on a peer whose gpud is restarting (gpud.health.prober.restarting):
    a warning, since its replicas and Ray keep serving."""
    return PairVerdict(
        "warning",
        "restarting",
        f"gpud restarting on {peer.name}: its peer API {peer} refuses connections, but Serf "
        f"sees it alive and its workload's ports answer, so its replicas and Ray role are kept "
        f"for up to {grace_s:g} s (health.restart_grace_s)",
        f"if it does not come back, see why on {peer.name}: systemctl status gpud; "
        "journalctl -u gpud",
    )


class NatVerdict(msgspec.Struct, frozen=True):
    behind_nat: bool
    message: str = ""


RAY_NAT_ADVICE = (
    "Ray needs host networking (or every port mapped 1:1); this node will not be Ray head"
)


def detect_nat(
    us: Endpoint, address_is_local: bool | None, reached: int, reached_but_no_way_back: int
) -> NatVerdict:
    """Behind NAT / port mapping when the advertised address is not on a local interface, or
    when at least two peers answer us but none of them can connect back to us.

    One such peer alone is a one-way firewall as likely as NAT; its pair verdict says so.
    """
    if address_is_local is False:
        return NatVerdict(
            True,
            f"the advertised address {us.addr} is not on any local interface: this node is "
            f"behind NAT or port mapping (Docker bridge mode?). {RAY_NAT_ADVICE}",
        )
    if reached >= 2 and reached_but_no_way_back == reached:
        return NatVerdict(
            True,
            f"we reach {reached} peers but none of them can connect back to {us}: the "
            f"advertised address is not reachable from outside (NAT or port mapping). "
            f"{RAY_NAT_ADVICE}",
        )
    return NatVerdict(False)


MAX_REASONS = 10


def judge_node(
    probed: bool,
    pairs: list[PairVerdict],
    nat: NatVerdict,
    network: Sequence[tuple[Severity, str]] = (),
) -> tuple[HealthState, list[str]]:
    """This node's summary: critical behind NAT, on a critical network problem (the advertised
    address was removed, its link is down) or when most peers (of at least two) are
    unreachable; warning when any pair is not passing or the network check warns; the reasons
    name each problem."""
    reasons = [nat.message] if nat.behind_nat else []
    reasons += [message for _, message in network]
    problems = [p for p in pairs if p.state in ("warning", "critical")]
    reasons += [p.message for p in problems[:MAX_REASONS]]
    if len(problems) > MAX_REASONS:
        reasons.append(f"and {len(problems) - MAX_REASONS} more peers with problems")
    critical = sum(p.state == "critical" for p in pairs)
    judged = sum(p.state != "unknown" for p in pairs)
    network_critical = any(severity == "critical" for severity, _ in network)
    if nat.behind_nat or network_critical or (judged >= 2 and critical * 2 > judged):
        return "critical", reasons
    if problems or network:
        return "warning", reasons
    if not probed:
        return "unknown", ["no probe round finished yet"]
    if pairs and judged == 0:
        return "unknown", ["not enough probe results yet"]
    return "passing", reasons if pairs else ["no peers to probe"]


def majority_verdict(states: list[DirectionState], observers: int) -> bool | None:
    """Is a node reachable as seen by a majority of its ``observers``?

    ``states`` holds one entry per observer that has an opinion. True when more than half of
    all observers reach it, False when more than half cannot, None when nobody has a majority
    (too few views yet, or opinions split): the caller then falls back to other evidence.
    """
    if sum(s == "passing" for s in states) * 2 > observers:
        return True
    if sum(s == "critical" for s in states) * 2 > observers:
        return False
    return None
