"""The `serf agent` child: its generated configuration, its supervision, its RPC connection.

gpud writes Serf's JSON configuration itself (0600: it holds a fresh RPC token every start
and points at the gossip keyring), starts `serf agent` in its own process group under a
Supervisor, and keeps one authenticated RPC connection to it, reconnecting whenever the
connection breaks while serf lives. Other components use ``rpc`` once ``ready`` is set, and
``query``/``on_query`` for cluster-wide questions (the Ray election votes over them).

Serf outlives gpud: it writes to ``<state_dir>/logs/serf.log`` (rotated), never to a pipe
gpud reads, and gpud's exit (graceful or not) leaves it running, with no leave, so the node
never shows `left` or `failed` to its peers. The next gpud adopts it when it verifies it,
else stops it (gpud.serf.adoption); an adopted serf keeps gossiping the tags it holds.

What serf's output says of gossip it cannot decrypt is gathered here; the problems it makes,
with those of an unkeyed cluster, are gpud.serf.trust's.

Serf's query events do not say who asked, so ``query`` wraps the payload in a small msgpack
envelope ``[sender node name, payload]`` and handlers get the sender's name back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping

import msgpack
import msgspec
from aiohttp import web

from gpud import log, preflight
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.context import NodeContext
from gpud.errors import ConfigError
from gpud.process import ChildProcess, ChildStartError, Supervisor, SupervisorStatus
from gpud.secret import cluster_key
from gpud.serf import rpc_port
from gpud.serf.adoption import SERF_RPC, AdoptedSerf, SerfRpc, argv, restored_tags, serf_record
from gpud.serf.config import (
    join_address,
    seed_keyring,
    serf_binary,
    serf_config,
    undecryptable,
    write_private,
)
from gpud.serf.rpc import QueryEvent, SerfConnectionError, SerfRPC, SerfRPCError
from gpud.serf.trust import trust_problems
from gpud.state import open_store
from gpud.tags import Tags, TagsError, decode, encode

QueryHandler = Callable[[str, bytes], Awaitable[bytes | None]]

# How long a fresh serf may take before its RPC port answers.
RPC_CONNECT_DEADLINE_S = 20.0
# How often the member count in status() is refreshed: also the liveness check of serf's RPC,
# so a hung (SIGSTOPped) serf shows as unreachable within interval + timeout.
MEMBER_COUNT_INTERVAL_S = 2.0
RPC_PING_TIMEOUT_S = 2.0
# How often a connection to a live but unreachable serf is retried.
RPC_RETRY_S = 2.0
JOIN_TIMEOUT_S = 10.0
# How long one undecryptable message keeps its problem up (serf retries every few seconds).
UNDECRYPTABLE_MEMORY_S = 60.0


class SerfStatus(msgspec.Struct, kw_only=True):
    supervisor: SupervisorStatus
    rpc_connected: bool
    # Members Serf knows (any status), as of the last refresh; None before the first.
    members: int | None
    last_error: str | None
    config_file: str
    summary: str = ""


def wrap_query(sender: str, payload: bytes) -> bytes:
    return msgpack.packb([sender, payload], use_bin_type=True)


def unwrap_query(data: bytes) -> tuple[str, bytes]:
    """(sender, payload); a query not sent by gpud comes back as ("", data)."""
    with contextlib.suppress(ValueError, msgpack.UnpackException):
        sender, payload = msgpack.unpackb(data, raw=False)
        if isinstance(sender, str) and isinstance(payload, bytes):
            return sender, payload
    return "", data


class RpcSquatted(SerfConnectionError):
    """Something other than our serf child listens on the RPC port: it never gets the token."""

    def __init__(self, conflict: preflight.PortConflict) -> None:
        super().__init__(conflict.describe())
        self.conflict = conflict


class SerfAgent(ComponentBase):
    """Component "serf": the supervised `serf agent` and the RPC connection to it."""

    name = "serf"

    def __init__(self, ctx: NodeContext, adopted: AdoptedSerf | None = None) -> None:
        """``adopted``: a predecessor's serf (verified by `adopt_leftover_serf`) to take over
        instead of starting one."""
        self.ctx = ctx
        self._store = open_store(ctx.config.state_dir)
        self.dir = ctx.config.state_dir / "serf"
        self.config_file = self.dir / "serf.json"
        self.token_file = self.dir / "rpc_auth"
        self.keyring_file = self.dir / "keyring.json"
        # Fingerprint of the cluster key gpud last wrote into the keyring (see keep_keyring).
        self.keyring_seed_file = self.dir / "keyring.seed"
        self.log_file = ctx.config.state_dir / "logs" / "serf.log"
        self.ready = asyncio.Event()
        self.rpc: SerfRPC | None = None
        self._token: str | None = None
        # Where serf's RPC listens: serf.rpc_port, or another port while a squatter holds it.
        self._rpc_port = ctx.config.serf.rpc_port
        child = None
        if adopted is not None:
            child = self._child(serf_binary(ctx.config.serf.binary) or "serf")
            if child.adopt(adopted.group):
                self._token, self._rpc_port = adopted.rpc.token, adopted.rpc.port
            else:
                child = None
        # The tags gpud started with: the fields its components change after an adoption
        # are its own, the rest the adopted serf's (`restored_tags`).
        self._initial_tags = ctx.tags
        # A serf a previous gpud left running is adopted (``adopted``) or stopped by the
        # agent before this one starts; gpud's exit leaves serf running for the next gpud.
        self.supervisor = Supervisor(
            "serf",
            self._make_child,
            record=serf_record(ctx.config),
            adopted=child,
            keep_on_cancel=True,
        )
        self._handlers: dict[str, QueryHandler] = {}
        self._published: dict[str, str] = {}
        self._members: int | None = None
        self._last_error: str | None = None
        # Ports another process holds (found before a start, or a squatter on the RPC port).
        self._conflicts: list[preflight.PortConflict] = []
        self._rpc_squat: preflight.PortConflict | None = None
        # Set while serf's RPC does not answer although its process lives (hung, SIGSTOPped).
        self._unanswered: str | None = None
        self._supervisor_task: asyncio.Task[None] | None = None
        self._leaving = False
        # Address -> (kind, monotonic time) of the last gossip serf could not decrypt.
        self._undecryptable: dict[str, tuple[str, float]] = {}
        # The cluster key file readable beyond root and the service (checked at each start).
        self._key_warnings: list[str] = []
        self._log = log.get("serf")
        ctx.set_tag_publisher(self.publish_tags)

    # -- the child

    async def _make_child(self) -> ChildProcess:
        if self._leaving:
            raise ChildStartError("not restarting serf: this node has left the cluster")
        binary = self.ctx.config.serf.binary
        path = serf_binary(binary)
        if path is None:
            raise FileNotFoundError(
                f"serf executable {binary or 'serf'!r} not found (install gpud's package, "
                "which bundles it, or set serf.binary)"
            )
        # Our previous child is gone (the Supervisor stops it before making the next), so a
        # port that cannot be bound now is another process's: say whose instead of letting
        # serf fail with "address already in use".
        conflicts = preflight.check(
            self.ctx.config, self.ctx.advertise_addr, self.ctx.advertise_is_local, "serf"
        )
        # Only gpud uses serf's RPC: a squatted RPC port need not keep serf down.
        self._rpc_squat, self._conflicts = rpc_port.split_squat(conflicts)
        self._rpc_port = self.ctx.config.serf.rpc_port
        if self._rpc_squat is not None:
            self._rpc_port = rpc_port.free_loopback_port()
            log.warning(self._log, "serf RPC port squatted", problem=self._rpc_squat.describe())
        if self._conflicts:
            for conflict in self._conflicts:
                log.error(self._log, "port conflict", problem=conflict.describe())
            raise ChildStartError(preflight.summary(self._conflicts))
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._token = secrets.token_urlsafe(32)
        try:
            key = cluster_key(self.ctx.config)
        except ConfigError as exc:  # the Supervisor reports it and retries with backoff
            raise ChildStartError(str(exc)) from None
        self._key_warnings = preflight.host_warnings(self.ctx.config)
        for warning in self._key_warnings:
            log.warning(self._log, warning)
        if key is not None and seed_keyring(self.keyring_file, self.keyring_seed_file, key):
            log.warning(
                self._log,
                "keeping serf's rotated keyring; cluster.key_file no longer holds a key "
                "of it: write the new primary key there (gpud keys list)",
                keyring=str(self.keyring_file),
            )
        elif key is None and self.keyring_file.exists():
            self.keyring_file.unlink()
            self.keyring_seed_file.unlink(missing_ok=True)
        config = serf_config(
            rpc_port.with_rpc_port(self.ctx.config, self._rpc_port),
            node_name=self.ctx.node_name,
            advertise_addr=self.ctx.advertise_addr,
            tags=self.ctx.tags,
            rpc_auth=self._token,
            keyring_file=str(self.keyring_file) if key is not None else None,
            snapshot_path=str(self.dir / "snapshot"),
            advertise_is_local=self.ctx.advertise_is_local,
        )
        self._published = dict(config["tags"])
        write_private(self.config_file, json.dumps(config, indent=2))
        write_private(self.token_file, self._token + "\n")
        await asyncio.to_thread(self._store.put, SERF_RPC, SerfRpc(self._rpc_port, self._token))
        return self._child(path)

    def _child(self, path: str) -> ChildProcess:
        # Its output goes to a file, not a pipe: serf outlives gpud (module docstring).
        return ChildProcess(
            "serf",
            argv(path, self.config_file),
            on_line=self._note_output,
            log_path=self.log_file,
        )

    def _note_output(self, line: str) -> bool:
        """Serf's output line: remember gossip it could not decrypt, and log that once per
        address and UNDECRYPTABLE_MEMORY_S (serf repeats it every second), not every line.
        Returns whether the line still goes to the log as it is."""
        if self._leaving:
            # Serf's warnings while it shuts down after our leave ("Serf shutdown detected",
            # an RPC write to the closed connection) are expected: info, not journal noise.
            parsed = log.parse_child_line(line)
            if parsed is not None:
                log.info(self._log, parsed[1], **parsed[2])
            return False
        found = undecryptable(line)
        if found is None:
            return True
        kind, addr = found
        now = time.monotonic()
        previous = self._undecryptable.get(addr)
        self._undecryptable[addr] = (kind, now)
        if previous is None or now - previous[1] >= UNDECRYPTABLE_MEMORY_S:
            log.warning(
                self._log,
                "cannot join: gossip cannot be decrypted; cluster.key differs"
                if kind == "join"
                else "a host sends gossip we cannot decrypt (repeats not logged)",
                addr=addr,
            )
        return False

    # -- running

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._supervisor_task = tg.create_task(self.supervisor.run())
            tg.create_task(self._keep_connected())

    async def _keep_connected(self) -> None:
        previous: ChildProcess | None = None
        previous_restored: ChildProcess | None = None
        while True:
            child = await self._running_child()
            if self._leaving:
                # After our leave serf is on its way out: nothing to reconnect to.
                await self._wait_gone(child, None)
                continue
            if child is not previous:  # a new serf: what the old one did no longer applies
                self._unanswered = None
                previous = child
            try:
                rpc = await self._connect(child)
            except (SerfConnectionError, SerfRPCError) as exc:
                if isinstance(exc, RpcSquatted):
                    self._conflicts = [exc.conflict]
                if str(exc) != self._last_error:  # once per cause, not once per retry
                    log.error(self._log, "serf RPC unreachable, not connected", error=str(exc))
                self._last_error = str(exc)
                # Retry while serf lives (a hung serf may come back), at once when it exits.
                with contextlib.suppress(TimeoutError):
                    await within(self._wait_gone(child, None), RPC_RETRY_S)
                continue
            try:
                if child.adopted and child is not previous_restored:
                    # Before ``rpc`` is published: no component's tags may reach serf first.
                    previous_restored = child
                    await self._restore_tags(rpc)
            except (SerfConnectionError, SerfRPCError) as exc:
                self._last_error = str(exc)
                await rpc.close()
                await asyncio.sleep(RPC_RETRY_S)
                continue
            self.rpc = rpc
            self._last_error = None
            self._conflicts = []
            self._unanswered = None
            try:
                # Tags published while the connection was down reach serf now.
                await self._send_tags(rpc, encode(self.ctx.tags))
                self.ready.set()
                log.info(self._log, "serf RPC connected", pid=child.pid)
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._answer_queries(rpc)),
                        tg.create_task(self._count_members(rpc)),
                    ]
                    await self._wait_gone(child, rpc)
                    for task in tasks:
                        task.cancel()
            except* (SerfConnectionError, SerfRPCError) as group:
                self._last_error = str(group.exceptions[0])
            finally:
                self.ready.clear()
                self.rpc = None
                await rpc.close()
            # Cancelled while a query or count task failed (serf stopping): Python 3.11's
            # TaskGroup then raises their errors, caught above, not the cancellation. Keep it.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise asyncio.CancelledError
            if child is self.supervisor.child and child.returncode is None and not self._leaving:
                log.warning(
                    self._log, "serf RPC connection lost, reconnecting", error=self._last_error
                )
                await asyncio.sleep(0.5)

    async def _running_child(self) -> ChildProcess:
        while True:
            child = self.supervisor.child
            if (
                self.supervisor.status.state == "running"
                and child is not None
                and child.returncode is None
            ):
                return child
            await asyncio.sleep(0.1)

    def _child_gone(self, child: ChildProcess) -> bool:
        return self.supervisor.child is not child or child.returncode is not None

    async def _wait_gone(self, child: ChildProcess, rpc: SerfRPC | None) -> None:
        """Until the child exits (the Supervisor stops a child before replacing it) or
        ``rpc`` breaks."""
        # Shielded: cancelling a waiter must not cancel the child's output pump.
        waits = [asyncio.ensure_future(asyncio.shield(child.wait()))]
        if rpc is not None:
            waits.append(asyncio.ensure_future(rpc.wait_closed()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
                # Retrieve what a finished waiter raised, or asyncio logs "Task exception was
                # never retrieved" when it is collected.
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()

    async def _connect(self, child: ChildProcess) -> SerfRPC:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RPC_CONNECT_DEADLINE_S
        port = self._rpc_port
        while True:
            try:
                # The token goes only to a listener our own serf child holds.
                owner = preflight.rpc_listener(port, child.pid or -1)
                if isinstance(owner, preflight.PortConflict):
                    raise RpcSquatted(owner)
                if owner == "nobody":
                    raise SerfConnectionError(f"serf RPC is not listening on 127.0.0.1:{port} yet")
                return await SerfRPC.connect("127.0.0.1", port, self._token)
            except RpcSquatted:
                raise
            except SerfConnectionError:
                if loop.time() > deadline:
                    raise
                if self._child_gone(child):
                    raise SerfConnectionError("serf exited before its RPC port answered") from None
                await asyncio.sleep(0.2)

    async def _count_members(self, rpc: SerfRPC) -> None:
        """Refresh the member count; a serf that stops answering (hung, SIGSTOPped) is shown
        as unreachable at once and the connection is dropped (then re-made when it answers)."""
        while True:
            try:
                members = await within(rpc.members(), RPC_PING_TIMEOUT_S)
            except TimeoutError:
                self._unanswered = (
                    f"serf RPC unreachable: no answer within {RPC_PING_TIMEOUT_S:g} s "
                    f"(serf pid {self.supervisor.status.pid} is alive but hung or stopped)"
                )
                log.error(self._log, "serf RPC does not answer", timeout_s=RPC_PING_TIMEOUT_S)
                raise SerfConnectionError(self._unanswered) from None
            self._members = len(members)
            self._unanswered = None
            await asyncio.sleep(MEMBER_COUNT_INTERVAL_S)

    # -- tags

    async def publish_tags(self, tags: Tags) -> None:
        """Gossip ``tags`` (the next generated config carries them too); raises TagsError
        before changing anything when they are too large."""
        encoded = encode(tags)
        rpc = self.rpc
        if rpc is not None:
            await self._send_tags(rpc, encoded)

    async def _restore_tags(self, rpc: SerfRPC) -> None:
        """An adopted serf gossips its predecessor's tags: keep them (the Ray role, term and
        GCS port, the port block, the replicas' claims) rather than announce a fresh node,
        with what this gpud's components set since it started."""
        own = [m for m in await rpc.members() if m.name == self.ctx.node_name]
        if not own:
            return
        self._published = dict(own[0].tags)
        try:
            announced = decode(own[0].tags)
        except TagsError as exc:
            log.warning(
                self._log, "adopted serf's tags unreadable; gossiping fresh ones", error=str(exc)
            )
            return
        self.ctx.tags = restored_tags(announced, self.ctx.tags, self._initial_tags)
        log.info(
            self._log,
            "serf adopted; its tags kept",
            pid=self.supervisor.status.pid,
            ray=self.ctx.tags.ray,
            term=self.ctx.tags.term,
            gcs=self.ctx.tags.gcs,
        )

    async def _send_tags(self, rpc: SerfRPC, encoded: dict[str, str]) -> None:
        stale = [key for key in self._published if key not in encoded]
        await rpc.tags(add=encoded, delete=stale)
        self._published = dict(encoded)

    # -- reload

    async def join(self, entries: list[str]) -> None:
        """Join ``entries`` now (a reload changed serf.retry_join; the next serf start retries
        them as its retry_join). A failure is logged: serf keeps the members it has."""
        rpc = self.rpc
        if rpc is None or not entries:
            return
        addrs = [join_address(entry, self.ctx.config.serf.bind_port) for entry in entries]
        try:
            joined = await rpc.join(addrs, timeout_s=JOIN_TIMEOUT_S)
            log.info(self._log, "joined", addrs=",".join(addrs), reached=joined)
        except (SerfConnectionError, SerfRPCError) as exc:
            log.warning(self._log, "join failed", addrs=",".join(addrs), error=str(exc))

    # -- address changes and shutdown

    def readvertise(self, new_addr: str) -> None:
        """Advertise ``new_addr`` from now on: restart serf with it."""
        log.info(self._log, "re-advertising", old=self.ctx.advertise_addr, new=new_addr)
        self.ctx.advertise_addr = new_addr
        self.ctx.advertise_is_local = True  # a re-advertised address comes from a local interface
        self.ready.clear()
        self.supervisor.restart()

    @property
    def leaving(self) -> bool:
        """True once this node has started its graceful leave (serf then goes away)."""
        return self._leaving

    async def leave(self) -> None:
        """Leave the cluster gracefully (bounded by serf.leave_timeout_s), then stop serf."""
        self._leaving = True
        self.supervisor.stop_on_cancel()  # a node that left has no serf for the next gpud
        timeout = self.ctx.config.serf.leave_timeout_s
        rpc = self.rpc
        if rpc is not None:
            try:
                await rpc.leave(timeout_s=timeout)
                log.info(self._log, "left the cluster")
                # Closed by us before serf exits, so its going away is not a lost connection.
                await rpc.close()
            except (SerfConnectionError, SerfRPCError) as exc:
                log.warning(self._log, "graceful leave failed", error=str(exc))
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor_task
        else:
            await self.supervisor.stop()

    # -- queries

    async def query(
        self,
        name: str,
        payload: bytes,
        *,
        timeout_s: float | None = None,
        enough: Callable[[Mapping[str, bytes]], bool] | None = None,
    ) -> dict[str, bytes]:
        """Ask every member; returns node name -> response payload (responders only), early
        once ``enough(responses)`` holds."""
        rpc = self.rpc
        if rpc is None or not self.ready.is_set():
            raise SerfConnectionError(f"serf query {name}: serf is not connected")
        result = await rpc.query(
            name, wrap_query(self.ctx.node_name, payload), timeout_s=timeout_s, enough=enough
        )
        return result.responses

    def on_query(self, name: str, handler: QueryHandler) -> None:
        """Answer incoming queries called ``name`` with ``handler(from_node, payload)``."""
        self._handlers[name] = handler

    async def _answer_queries(self, rpc: SerfRPC) -> None:
        async with asyncio.TaskGroup() as tg:
            async for event in rpc.stream("query"):
                if isinstance(event, QueryEvent) and event.name in self._handlers:
                    tg.create_task(self._answer(rpc, event))

    async def _answer(self, rpc: SerfRPC, event: QueryEvent) -> None:
        sender, payload = unwrap_query(event.payload)
        try:
            response = await self._handlers[event.name](sender, payload)
            if response is not None:
                await rpc.respond(event.id, response)
        except (SerfConnectionError, SerfRPCError) as exc:
            log.info(self._log, "query not answered", query=event.name, error=str(exc))
        except Exception as exc:  # a handler bug must not end the query stream
            log.error(self._log, "query handler failed", query=event.name, error=repr(exc))

    # -- component protocol

    def status(self) -> SerfStatus:
        supervisor = msgspec.structs.replace(self.supervisor.status)
        return SerfStatus(
            supervisor=supervisor,
            rpc_connected=self._rpc_answering(),
            members=self._members,
            last_error=self._last_error or supervisor.last_error,
            config_file=str(self.config_file),
            summary=self.summary(),
        )

    def _rpc_answering(self) -> bool:
        return self.rpc is not None and not self.rpc.closed and self._unanswered is None

    def routes(self) -> list[web.RouteDef]:
        """`gpud keys ...`: the keyring over Serf's RPC (admin only)."""
        from gpud.serf import keys

        return keys.routes(lambda: self.rpc, lambda: self.ctx.config.api.admin_group)

    def summary(self) -> str:
        problems = self.problems()
        if problems:  # the cause, first
            return problems[0].message
        state = self.supervisor.status.state
        if state != "running" or self.rpc is None:
            return f"{state}, RPC not connected"
        return f"running, {self._members if self._members is not None else '?'} members"

    def problems(self) -> list[Problem]:
        """Port conflicts, a hung or unreachable RPC, or serf not running — the cause first."""
        if self._leaving:
            return []
        found = [c.problem() for c in self._conflicts] + self._trust_problems()
        found += rpc_port.squat_problems(self._rpc_squat, self._rpc_port)
        supervisor = self.supervisor.status
        if self._unanswered is not None:
            found.append(
                Problem(
                    code="serf.rpc_unreachable",
                    severity="critical",
                    subject="serf",
                    message=self._unanswered,
                    fix="if it stays so, `systemctl restart gpud` (the watchdog restarts gpud "
                    "after 60 s without serf)",
                )
            )
        elif supervisor.state in ("backoff", "failed") and not found:
            found.append(
                Problem(
                    code="serf.down",
                    severity="critical",
                    subject="serf",
                    message=f"serf is not running ({supervisor.state}): "
                    f"{supervisor.last_error or 'no reason recorded'}",
                    fix="see serf's output in `journalctl -u gpud`",
                )
            )
        elif supervisor.state == "running" and self.rpc is None and self._last_error and not found:
            found.append(
                Problem(
                    code="serf.rpc_unreachable",
                    severity="critical",
                    subject="serf",
                    message=f"serf RPC unreachable: {self._last_error}",
                    fix="see serf's output in `journalctl -u gpud`",
                )
            )
        return found

    def _trust_problems(self) -> list[Problem]:
        """`trust_problems` of the gossip serf could not decrypt in the last
        UNDECRYPTABLE_MEMORY_S (older addresses are forgotten)."""
        now = time.monotonic()
        self._undecryptable = {
            addr: (kind, at)
            for addr, (kind, at) in self._undecryptable.items()
            if now - at < UNDECRYPTABLE_MEMORY_S
        }
        return trust_problems(
            self.ctx.config,
            self._key_warnings,
            self._undecryptable.keys(),
            self.ctx.node_name,
            self.ctx.members,
        )

    def metrics(self) -> list[Metric]:
        return [
            gauge("gpud_serf_rpc_up", "1 while serf's RPC answers", self._rpc_answering()),
            gauge("gpud_serf_members", "members serf knows, any status", self._members or 0),
        ]
