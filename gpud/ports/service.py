"""The ports component: claims this node's block, reserves it in the kernel, leases ports.

Leases are durable before they are answered and never share a port (``gpud.leasebook``); the
API in front of them is ``gpud.leasefront``'s, guarded: only root or api.admin_group leases,
and only the uid that leased releases. What is the ports' own: the block claim, the kernel
reservation, and which ports of the block a request gets.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable

import msgspec
from aiohttp import web

from gpud import api, log
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.context import Member, NodeContext
from gpud.errors import ApiError
from gpud.leasebook import LeaseBook, new_lease_id
from gpud.leasefront import LeaseFront
from gpud.ports import blocks, reserve
from gpud.ports.blocks import ClaimRecord, ClaimState
from gpud.ports.leases import (
    CLAIM,
    RESERVED,
    Lease,
    LeaseRequest,
    LeaseStore,
    StoredLease,
    choose_ports,
)
from gpud.state import open_store

_log = log.get("ports")

# How often the claim loop looks at membership when nothing wakes it.
CLAIM_TICK_S = 0.5
# A confirmed block with fewer free ports than this share is a warning (ports.block_nearly_full).
NEARLY_FULL_SHARE = 0.1
# Claims first seen within this long after this node first saw another member were there
# before it joined: their first sighting says nothing about when they appeared.
JOIN_GRACE_S = 15.0


class PortsStatus(msgspec.Struct, kw_only=True):
    """The `ports` section of gpud status."""

    summary: str
    state: ClaimState
    block: int | None
    # First and last port of the block (inclusive), when there is one.
    first: int | None
    last: int | None
    lease_count: int
    leased: int
    free: int
    # "reserved", "disabled (ports.reserve = false)", "pending" or why it failed.
    reservation: str
    warnings: list[str]


class PortsDetail(PortsStatus, kw_only=True):
    """GET /v1/ports: the status plus every lease."""

    leases: list[Lease]


def _bind_ok(family: socket.AddressFamily, kind: socket.SocketKind, addr: str, port: int) -> bool:
    sock = socket.socket(family, kind)
    try:
        sock.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class PortsService(ComponentBase):
    name = "ports"

    def __init__(self, ctx: NodeContext, verified: Callable[[str], bool] | None = None) -> None:
        self.ctx = ctx
        # Is a member a verified gpud node (HealthService.prober.verified)? Without a prober
        # (standalone, tests) every member is taken at its word.
        self._verified = verified or (lambda _name: True)
        # (member, block) -> Unix seconds this node first saw that claim (0: before it joined).
        self._first_seen: dict[tuple[str, int], int] = {}
        # Wall time this node first saw another member (None: not yet).
        self._joined_at: float | None = None
        self._refused: tuple[blocks.Refusal, ...] = ()
        self.cfg = ctx.config.ports
        self._n_blocks = blocks.block_count(self.cfg)
        self._state_store = open_store(ctx.config.state_dir)
        self._book: LeaseBook[LeaseRequest, StoredLease] = LeaseBook(
            "lease",
            LeaseStore(self._state_store),
            allocate=self._allocate,
            on_release=lambda item: self._used.difference_update(item.lease.ports),
            reindex=self._reindex,
            describe=lambda item: {
                "id": item.lease.id,
                "owner": item.lease.owner,
                "ports": len(item.lease.ports),
            },
            grace_s=lambda: self.cfg.zombie_grace_s,
            logger=_log,
        )
        self._front: LeaseFront[LeaseRequest, StoredLease] = LeaseFront(
            self._book,
            LeaseRequest,
            not_ready=self._not_confirmed,
            check=self._check_count,
            admin_group=lambda: self.ctx.config.api.admin_group,
        )
        self._used: set[int] = set()
        self._reindex(self._book.leases)
        self._claim = self._load_claim()
        self._state: ClaimState = "claiming"
        self._confirmed = asyncio.Event()
        self._reserved: list[reserve.PortRange] = self._state_store.get(RESERVED) or []
        self._reservation = "pending" if self.cfg.reserve else "disabled (ports.reserve = false)"
        self._wake_claim = asyncio.Event()
        self._cursor = 0
        self._bind_checks = self._bind_checks_for(ctx.advertise_addr)
        self._warnings = self._config_warnings()
        for warning in self._warnings:
            log.warning(_log, warning)

    # ---- in-process API -------------------------------------------------------------------

    async def ready(self) -> None:
        """Wait until this node's block is confirmed."""
        await self._confirmed.wait()

    async def lease(
        self, owner: str, count: int, *, contiguous: bool = False, pid: int | None = None
    ) -> Lease:
        """Lease ``count`` ports of this node's block; durable when this returns."""
        return await self._front.lease(owner=owner, count=count, contiguous=contiguous, pid=pid)

    async def release(self, lease_id: str) -> None:
        await self._front.release(lease_id)

    async def transfer(self, lease_id: str, pid: int) -> None:
        """Make the running process ``pid`` the lease's owner (a re-adopted child's lease)."""
        await self._front.transfer(lease_id, pid)

    def leases(self) -> list[Lease]:
        return self._front.leases()

    def block_range(self) -> range | None:
        if self._claim is None or self._state == "exhausted":
            return None
        return blocks.block_range(self.cfg, self._claim.blk)

    async def run(self) -> None:
        self.ctx.on_members_changed(lambda _members: self._wake_claim.set())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._book.run())
            tg.create_task(self._claim_loop())

    def status(self) -> PortsStatus:
        return PortsStatus(**self._status_fields())

    def summary(self) -> str:
        return str(self._status_fields()["summary"])

    def problems(self) -> list[Problem]:
        found = [
            Problem(
                code="ports.range_overlaps_ephemeral",
                subject="ports",
                severity="warning",
                message=w,
                fix="move ports.range_start/range_end below net.ipv4.ip_local_port_range",
            )
            for w in self._warnings
        ]
        if self._reservation not in ("reserved", "pending") and self.cfg.reserve:
            found.append(
                Problem(
                    code="ports.block_not_reserved",
                    subject="ports",
                    severity="warning",
                    message=f"port block not reserved in the kernel: {self._reservation}; the "
                    "kernel may hand ports of the block to outbound connections",
                    fix="run gpud as root with a writable /proc/sys/net, or reserve the block "
                    "with `sysctl net.ipv4.ip_local_reserved_ports`",
                )
            )
        for refusal in self._refused:
            found.append(
                Problem(
                    code="ports.claim_refused",
                    subject=refusal.name,
                    severity="warning",
                    message=f"{refusal.name} at {refusal.addr} claims this node's port block "
                    f"{refusal.blk}; refused: {refusal.reason}",
                    fix=f"find what runs the member {refusal.name} at {refusal.addr}: it holds "
                    "the cluster key; if it is not yours, rotate the key (`gpud keys`)",
                )
            )
        if self._state == "exhausted":
            found.append(
                Problem(
                    code="ports.block_exhausted",
                    subject="ports",
                    severity="critical",
                    message=f"no free port block: all {self._n_blocks} blocks are claimed by "
                    f"nodes on {self.ctx.advertise_addr}",
                    fix="widen ports.range_start/range_end or lower ports.block_size",
                )
            )
        nearly_full = self._nearly_full()
        if nearly_full is not None:
            found.append(nearly_full)
        return found

    def _nearly_full(self) -> Problem | None:
        block, _, free = self._usage()
        if block is None or self._state != "confirmed":
            return None
        if free >= max(1, len(block) * NEARLY_FULL_SHARE):
            return None
        by_owner: dict[str, int] = {}
        for item in self._book.leases.values():
            by_owner[item.lease.owner] = by_owner.get(item.lease.owner, 0) + len(item.lease.ports)
        owners = ", ".join(
            f"{owner} ({n})" for owner, n in sorted(by_owner.items(), key=lambda kv: -kv[1])
        )
        return Problem(
            code="ports.block_nearly_full",
            subject="ports",
            severity="warning",
            message=f"block {self._claim.blk if self._claim else '?'} has {free} of "
            f"{len(block)} ports free; leased by {owners or 'nobody (ports bound by others)'}",
            fix="release leases that are no longer used (`gpud ports release ID`), or raise "
            "ports.block_size",
        )

    def metrics(self) -> list[Metric]:
        _, leased, free = self._usage()
        return [
            gauge("gpud_ports_leased", "Ports leased from this node's block.", leased),
            gauge("gpud_ports_free", "Ports still free in this node's block.", free),
            gauge(
                "gpud_ports_block_claimed",
                "1 while this node holds a confirmed port block.",
                float(self._state == "confirmed"),
            ),
        ]

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/ports", self._get_ports), *self._front.routes("/v1/ports/leases")]

    # ---- HTTP handlers ---------------------------------------------------------------------

    async def _get_ports(self, request: web.Request) -> web.Response:
        detail = PortsDetail(**self._status_fields(), leases=self.leases())
        return api.json_response(detail)

    # ---- leases ----------------------------------------------------------------------------

    def _check_count(self, request: LeaseRequest) -> None:
        if request.count > self.cfg.block_size:
            raise ApiError(
                400, f"count {request.count} exceeds the block size ({self.cfg.block_size})"
            )

    def _not_confirmed(self) -> str | None:
        if self._confirmed.is_set():
            return None
        where = f"block {self._claim.blk}" if self._claim else "a block"
        return (
            f"port block not confirmed yet (claiming {where}; state {self._state}); retry once "
            "gossip has settled"
        )

    def _reindex(self, leases: dict[str, StoredLease]) -> None:
        self._used = {p for s in leases.values() for p in s.lease.ports}

    def _allocate(self, request: LeaseRequest, pid_start: int | None) -> StoredLease | ApiError:
        """Ports for one request against the bookkeeping (the lease book commits it)."""
        block = self.block_range()
        if block is None:
            return ApiError(503, "this node holds no port block")
        ports = choose_ports(
            block, self._used, request.count, request.contiguous, self._port_free, self._cursor
        )
        if ports is None:
            kind = "contiguous " if request.contiguous else ""
            return ApiError(
                409,
                f"cannot lease {request.count} {kind}ports: block {self._claim.blk if self._claim else '?'} "
                f"has {len(block) - len(self._used & set(block))} unleased ports, some may be "
                "bound by other processes",
            )
        self._cursor = (ports[-1] - block.start + 1) % len(block)
        self._used.update(ports)
        lease = Lease(
            id=new_lease_id(),
            owner=request.owner,
            ports=ports,
            pid=request.pid,
            created=time.time(),
            uid=request.uid,
        )
        return StoredLease(lease=lease, pid_start=pid_start)

    def _bind_checks_for(
        self, addr: str
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, str]]:
        """Binds a port must pass: TCP on the advertised address, TCP and UDP on the wildcard."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        checks = [(family, socket.SOCK_STREAM, wildcard), (family, socket.SOCK_DGRAM, wildcard)]
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.bind((addr, 0))
            checks.insert(0, (family, socket.SOCK_STREAM, addr))
        except OSError as exc:
            # Port-mapped container: the advertised address is the host's, not ours.
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
        finally:
            probe.close()
        return checks

    def _port_free(self, port: int) -> bool:
        return all(_bind_ok(fam, kind, addr, port) for fam, kind, addr in self._bind_checks)

    # ---- block claim -----------------------------------------------------------------------

    def _load_claim(self) -> blocks.Claim | None:
        record = self._state_store.get(CLAIM)
        if record is None:
            return None
        geometry = (self.cfg.range_start, self.cfg.range_end, self.cfg.block_size)
        if (record.range_start, record.range_end, record.block_size) != geometry:
            log.warning(
                _log,
                "ports range changed in the config: the old block claim is void",
                blk=record.blk,
            )
            return None
        return blocks.Claim(blk=record.blk, confirmed_at=max(1, record.confirmed_at))

    def _views(self) -> tuple[blocks.ClaimView, ...]:
        """The members' claims, each with whether it is a verified gpud node and when this
        node first saw it (the bookkeeping ``blocks`` judges confirmation times against)."""
        now = time.time()
        me = self.ctx.node_name
        members = self.ctx.members
        if self._joined_at is None and any(
            m.name != me and m.status == "alive" for m in members.values()
        ):
            self._joined_at = now
        joining = self._joined_at is None or now - self._joined_at < JOIN_GRACE_S
        claims = {(m.name, m.tags.blk) for m in members.values() if m.tags is not None}
        # A claim that disappears is new when it comes back.
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in claims}
        for name, blk in claims:
            if (name, blk) not in self._first_seen:
                # This node's own claim is always dated: after a restart it is new to the others.
                unknown = joining and name != me
                self._first_seen[(name, blk)] = 0 if unknown else int(now)
        return tuple(
            _view(
                m,
                verified=m.name == me or self._verified(m.name),
                first_seen=self._first_seen.get((m.name, m.tags.blk if m.tags else -1), 0),
            )
            for m in members.values()
        )

    async def _claim_loop(self) -> None:
        """Thin I/O around ``blocks.step``: feed it members and clocks, carry out its actions."""
        settled_since = claimed_since = time.monotonic()
        while True:
            # Cleared before reading the members: a change from now on wakes the next round.
            self._wake_claim.clear()
            out = blocks.step(
                blocks.ClaimInput(
                    me=self.ctx.node_name,
                    addr=self.ctx.advertise_addr,
                    n_blocks=self._n_blocks,
                    settle_s=self.cfg.settle_s,
                    reserve=self.cfg.reserve,
                    claim=self._claim,
                    state=self._state,
                    settled_since=settled_since,
                    claimed_since=claimed_since,
                    published=(self.ctx.tags.blk, self.ctx.tags.bc),
                    views=self._views(),
                    now=time.monotonic(),
                    wall_now=int(time.time()),
                )
            )
            if out.state != "confirmed":
                # No lease from a block being given up, while it is given up.
                self._confirmed.clear()
            for action in out.actions:
                await self._act(action)
            if out.state != self._state:
                self._log_state(out)
            self._claim, self._state, settled_since = out.claim, out.state, out.settled_since
            claimed_since = out.claimed_since
            self._note_refusals(out.refused)
            if self._state == "confirmed":
                self._confirmed.set()
            try:
                await within(self._wake_claim.wait(), CLAIM_TICK_S)
            except TimeoutError:
                pass

    async def _act(self, action: blocks.Action) -> None:
        match action:
            case blocks.Drop(blk=blk, was_confirmed=was_confirmed):
                if was_confirmed:
                    log.error(
                        _log,
                        "lost a confirmed port block to another node on this address; "
                        "leases in it stay until released",
                        blk=blk,
                    )
                    await asyncio.to_thread(self._state_store.put, CLAIM, None)
                if self._reserved:
                    error = await asyncio.to_thread(reserve.unreserve, self._reserved)
                    if error is None:
                        self._reserved = []
                        await asyncio.to_thread(self._state_store.put, RESERVED, [])
            case blocks.Confirm(blk=blk, confirmed_at=confirmed_at):
                record = ClaimRecord(
                    blk=blk,
                    confirmed_at=confirmed_at,
                    range_start=self.cfg.range_start,
                    range_end=self.cfg.range_end,
                    block_size=self.cfg.block_size,
                )
                await asyncio.to_thread(self._state_store.put, CLAIM, record)
            case blocks.Announce(blk=blk, bc=bc):
                await self.ctx.update_tags(blk=blk, bc=bc)
            case blocks.Reserve(blk=blk):
                await asyncio.to_thread(self._reserve, blk)

    def _note_refusals(self, refused: tuple[blocks.Refusal, ...]) -> None:
        known = {(r.name, r.blk) for r in self._refused}
        for r in refused:
            if (r.name, r.blk) not in known:
                log.warning(
                    _log,
                    "refused a claim of this node's port block",
                    member=r.name,
                    addr=r.addr,
                    blk=r.blk,
                    reason=r.reason,
                )
        self._refused = refused

    def _log_state(self, out: blocks.ClaimOutput) -> None:
        if out.state == "exhausted":
            log.error(
                _log, "no free port block", blocks=self._n_blocks, addr=self.ctx.advertise_addr
            )
        elif out.state == "claiming" and out.claim is not None:
            log.info(_log, "claiming port block", blk=out.claim.blk)
        elif out.state == "confirmed" and out.claim is not None:
            rng = blocks.block_range(self.cfg, out.claim.blk)
            log.info(
                _log,
                "port block confirmed",
                blk=out.claim.blk,
                first=rng.start,
                last=rng.stop - 1,
                reservation=self._reservation,
            )

    def _reserve(self, blk: int) -> None:
        rng = blocks.block_range(self.cfg, blk)
        result = reserve.reserve((rng.start, rng.stop - 1))
        if result.error is not None:
            self._reservation = result.error
            log.warning(_log, "cannot reserve the port block", error=result.error)
            return
        self._reservation = "reserved"
        if result.added:
            self._reserved = reserve.merge([*self._reserved, *result.added])
            self._state_store.put(RESERVED, self._reserved)

    # ---- status ----------------------------------------------------------------------------

    def _config_warnings(self) -> list[str]:
        ephemeral = reserve.ephemeral_range()
        space = (self.cfg.range_start, self.cfg.range_end - 1)
        if ephemeral is None or reserve.overlap(space, ephemeral) is None:
            return []
        lo, hi = reserve.overlap(space, ephemeral)  # type: ignore[misc]
        return [
            f"ports range {space[0]}-{space[1]} overlaps the kernel's ephemeral range "
            f"{ephemeral[0]}-{ephemeral[1]} (net.ipv4.ip_local_port_range) at {lo}-{hi}: "
            "outbound connections may take those ports unless the block is reserved"
        ]

    def _usage(self) -> tuple[range | None, int, int]:
        """The block in use (or None), its leased ports, its free ports."""
        block = self.block_range()
        if block is None:
            return None, 0, 0
        leased = len(self._used & set(block))
        return block, leased, len(block) - leased

    def _status_fields(self) -> dict[str, object]:
        block, leased, free = self._usage()
        if block is None:
            summary = (
                f"no free block among {self._n_blocks} on {self.ctx.advertise_addr}"
                if self._state == "exhausted"
                else "claiming a block"
            )
        else:
            summary = (
                f"block {self._claim.blk if self._claim else '?'} ({block.start}-{block.stop - 1}) "
                f"{self._state}, {leased} leased, {free} free"
            )
        if not self.cfg.reserve:
            summary += ", not reserved (ports.reserve = false)"
        elif self._reservation == "reserved":
            summary += ", reserved"
        elif self._reservation != "pending":
            summary += ", not reserved in the kernel"
        return {
            "summary": summary,
            "state": self._state,
            "block": self._claim.blk if block is not None and self._claim else None,
            "first": block.start if block is not None else None,
            "last": block.stop - 1 if block is not None else None,
            "lease_count": len(self._book.leases),
            "leased": leased,
            "free": free,
            "reservation": self._reservation,
            "warnings": list(self._warnings),
        }


def _view(member: Member, *, verified: bool, first_seen: int) -> blocks.ClaimView:
    tags = member.tags
    return blocks.ClaimView(
        name=member.name,
        addr=member.addr,
        status=member.status,
        blk=tags.blk if tags is not None else blocks.NO_BLOCK,
        confirmed_at=tags.bc if tags is not None else 0,
        verified=verified,
        first_seen=first_seen,
    )
