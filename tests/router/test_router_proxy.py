"""The router in process, in front of real aiohttp replicas on loopback, driven by the real
`openai` client: streaming and not, balance, affinity, retries that never duplicate work, a
replica killed during load, and bad input that is answered and never forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.router import (
    MODEL,
    UpstreamState,
    free_port,
    listing_of,
    serve_upstream,
    spawn,
    wait_listening,
)
from gpud import metrics
from gpud.deployments.model import DeploymentsList
from gpud.router.auth import hash_key
from gpud.router.proxy import CheckedBody
from gpud.router.service import RouterService
from tests.harness.config import config_for
from tests.harness.tls import tls_files
from tests.harness.wait import async_wait_for

pytestmark = pytest.mark.timeout(120)

KEY = "sk-test-" + "7" * 32
CHAT = [{"role": "user", "content": "hi"}]


class Rig:
    """Replicas on loopback and routers over one mutable deployments view."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.states: dict[str, UpstreamState] = {}
        self.ports: dict[str, int] = {}
        self.listing = DeploymentsList(node="t", digest="", lamport=0, deployments=[])
        self.routers: list[RouterService] = []
        self._stack = contextlib.AsyncExitStack()

    async def replica(self, name: str, **kw: Any) -> UpstreamState:
        state = UpstreamState(name, **kw)
        port = free_port()
        runner = await serve_upstream(state, "127.0.0.1", port)
        self._stack.push_async_callback(runner.cleanup)
        self.states[name], self.ports[name] = state, port
        self.listing = listing_of(self.ports)
        return state

    async def router(self, **overrides: Any) -> RouterService:
        cfg = {"enabled": True, "listen": "127.0.0.1", "port": free_port(), "queue_poll_s": 0.2}
        cfg.update(overrides)
        config = config_for(f"r{len(self.routers)}", self.tmp_path, {"router": cfg})
        router = RouterService(config, lambda: self.listing)
        task = asyncio.create_task(router.run())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._stack.push_async_callback(stop)
        await asyncio.wait_for(router.listening.wait(), 10)
        await async_wait_for(lambda: router.table.ready, 5, what="the routing table")
        self.routers.append(router)
        return router

    def client(self, router: RouterService, key: str = KEY, **kw: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{router.port}/v1", api_key=key, max_retries=0, **kw
        )
        # Closed inside the test's loop: a client left to the garbage collector closes its
        # connections after the loop is gone, as an unretrieved task error in a later test.
        self._stack.push_async_callback(client.close)
        return client

    def forwarded(self) -> int:
        return sum(len(s.bodies) for s in self.states.values())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    async with r._stack:
        yield r


def keys_file(tmp_path: Path, mode: int = 0o600) -> str:
    path = tmp_path / "router.keys"
    path.write_text(f"sha256:{hash_key(KEY)} test\n")
    path.chmod(mode)
    return str(path)


async def test_chat_completion_embeddings_and_streaming_pass_through(rig: Rig) -> None:
    await rig.replica("a", delay_s=0.3, chunks=4)
    router = await rig.router(api_keys_file=keys_file(rig.tmp_path))
    client = rig.client(router)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    reply = await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.choices[0].message.content == "ok" and reply.id.startswith("a-")
    text = await client.completions.create(model=MODEL, prompt="hi")
    assert text.choices[0].text == "ok"
    emb = await client.embeddings.create(model=MODEL, input="hi")
    assert emb.data[0].embedding == [0.0, 1.0]
    # Streaming: each chunk arrives as the replica writes it (0.3 s apart), not at the end.
    arrivals, tokens = [], []
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    async for chunk in stream:
        arrivals.append(time.monotonic())
        tokens.append(chunk.choices[0].delta.content)
    assert tokens == ["t0", "t1", "t2", "t3"]
    assert arrivals[-1] - arrivals[0] > 0.6, "chunks were buffered, not streamed"
    # The router's key never reaches the engine.
    assert rig.states["a"].count == 4 and rig.states["a"].with_authorization == 0
    families = {m.name: m for m in router.metrics()}
    assert ({"deployment": "bench", "code": "200"}, 4) in families[
        "gpud_router_requests_total"
    ].samples
    # Latency and time to first byte are histograms on the scrape, by deployment; every ready
    # upstream has an outstanding count, 0 when idle.
    scraped = {
        f.name: f
        for f in text_string_to_metric_families(
            metrics.exposition(metrics.registry(router.metrics), None)[0].decode()
        )
    }
    for name in ("gpud_router_time_to_first_byte_seconds", "gpud_router_request_duration_seconds"):
        family = scraped[name]
        assert family.type == "histogram"
        counts = [s for s in family.samples if s.name == f"{name}_count"]
        assert [(c.labels, c.value) for c in counts] == [({"deployment": "bench"}, 4.0)]
        assert any(s.name == f"{name}_bucket" and s.labels["le"] == "+Inf" for s in family.samples)
    outstanding = scraped["gpud_router_outstanding_requests"].samples
    assert [(s.labels["deployment"], s.value) for s in outstanding] == [("bench", 0.0)]


async def test_load_balances_two_replicas_and_a_session_sticks_on_every_router(rig: Rig) -> None:
    await rig.replica("a", delay_s=0.01)
    await rig.replica("b", delay_s=0.01)
    first, second = await rig.router(), await rig.router()
    client = rig.client(first)
    gate = asyncio.Semaphore(16)

    async def one() -> str:
        async with gate:
            reply = await client.chat.completions.create(model=MODEL, messages=CHAT)
            return reply.id.split("-")[0]

    served = await asyncio.gather(*(one() for _ in range(400)))
    a, b = served.count("a"), served.count("b")
    print(f"balance over 400 requests: a={a} b={b}")
    assert abs(a - b) <= 0.2 * (a + b) / 2
    # One session id: one replica, from either router; many ids use both replicas.
    homes = set()
    for router in (first, second):
        c = rig.client(router, default_headers={"x-session-id": "conversation-1"})
        for _ in range(10):
            homes.add((await c.chat.completions.create(model=MODEL, messages=CHAT)).id[0])
    assert len(homes) == 1
    spread = set()
    for i in range(20):
        c = rig.client(first, default_headers={"x-session-id": f"s{i}"})
        spread.add((await c.chat.completions.create(model=MODEL, messages=CHAT)).id[0])
    assert spread == {"a", "b"}


async def test_a_replica_reporting_a_long_queue_gets_no_new_requests(rig: Rig) -> None:
    long_queue = await rig.replica("a")
    await rig.replica("b")
    long_queue.waiting = 100
    router = await rig.router()
    await async_wait_for(lambda: router.depth.get(f"http://127.0.0.1:{rig.ports['a']}") == 100, 5)
    client = rig.client(router)
    for _ in range(30):
        await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert long_queue.count == 0 and rig.states["b"].count == 30


async def test_a_draining_replica_is_retried_elsewhere_and_a_dead_port_too(rig: Rig) -> None:
    draining = await rig.replica("a")
    await rig.replica("b")
    draining.draining = True
    rig.ports["dead"] = free_port()  # nothing listens: connection refused
    rig.listing = listing_of(rig.ports)
    router = await rig.router()
    client = rig.client(router)
    for _ in range(20):
        reply = await client.chat.completions.create(model=MODEL, messages=CHAT)
        assert reply.id.startswith("b-")
    assert rig.states["b"].count == 20 and not draining.bodies
    retries = {m.name: m for m in router.metrics()}["gpud_router_retries_total"].samples
    assert retries and retries[0][1] > 0
    # Every replica draining: the replica's own 503 comes back after the bounded attempts.
    rig.states["b"].draining = True
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.status_code == 503


async def test_kill_9_of_a_replica_during_load_fails_only_what_was_in_flight(rig: Rig) -> None:
    ports = {"a": free_port(), "b": free_port()}
    children = {
        n: spawn("--serve-upstream", str(p), "--name", n, "--delay", "0.2")
        for n, p in ports.items()
    }
    try:
        for p in ports.values():
            await wait_listening(p)
        rig.listing = listing_of(ports)  # b stays listed as ready: no probe runs here
        router = await rig.router()
        client = rig.client(router)
        results: list[tuple[float, float, bool]] = []
        stop_at = time.monotonic() + 4.0

        async def worker() -> None:
            while (start := time.monotonic()) < stop_at:
                try:
                    await client.chat.completions.create(model=MODEL, messages=CHAT)
                    ok = True
                except openai.APIError:
                    ok = False
                results.append((start, time.monotonic(), ok))

        async def kill() -> float:
            await asyncio.sleep(1.5)
            os.killpg(children["b"].pid, signal.SIGKILL)
            return time.monotonic()

        killed, *_ = await asyncio.gather(kill(), *(worker() for _ in range(8)))
    finally:
        for child in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)
    failed = [r for r in results if not r[2]]
    after = [r for r in results if r[0] > killed]
    print(
        f"kill -9 during load: {len(results)} requests, {len(failed)} failed, {len(after)} sent after the kill"
    )
    assert len(after) > 20 and all(ok for _, _, ok in after)
    assert all(start <= killed <= end for start, end, _ in failed), "a failure was not in flight"
    assert len(failed) <= 8


def one_shot_replica() -> tuple[int, threading.Event, threading.Event, list[bytes]]:
    """A replica on a raw socket: it answers one request on a keep-alive connection, then,
    when told, closes that connection and its listener (as a replica killed between two
    requests does). Its port, the "close" and "closed" events, and every byte it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    close, closed, received = threading.Event(), threading.Event(), []

    def serve() -> None:
        conn, _ = listener.accept()
        # The request ends with its JSON body's closing brace.
        while not b"".join(received).endswith(b"}") and (chunk := conn.recv(65536)):
            received.append(chunk)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        close.wait(10)
        conn.close()
        listener.close()
        closed.set()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], close, closed, received


async def test_a_pooled_connection_the_replica_closed_carries_no_request(rig: Rig) -> None:
    """The kill -9 race: the replica's FIN is in this host's kernel, the event loop has not
    read it, so aiohttp still holds the connection as reusable. The request must not go out
    on it, and the router must know it did not (so it may retry elsewhere)."""
    await rig.replica("a")
    router = await rig.router()
    http = router.proxy.session
    assert http is not None
    port, close, closed, received = one_shot_replica()
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with http.post(url, data=CheckedBody(b'{"model": "m"}')) as first:
        assert first.status == 200 and await first.read() == b"{}"
    close.set()
    # Blocking on purpose: the loop must not see the FIN before the next request takes the
    # pooled connection.
    assert closed.wait(5)
    time.sleep(0.05)  # noqa: ASYNC251
    sent = len(b"".join(received))
    body = CheckedBody(b'{"model": "m"}')
    with pytest.raises(aiohttp.ClientConnectionError) as err:
        await http.post(url, data=body)
    # The pooled connection was taken (a fresh one would have been refused: no listener) ...
    assert not isinstance(err.value, aiohttp.ClientConnectorError), err.value
    # ... and not a byte went out on it.
    assert not body.written and len(b"".join(received)) == sent


async def test_bad_input_is_answered_and_never_forwarded(rig: Rig) -> None:
    await rig.replica("a")
    router = await rig.router(api_keys_file=keys_file(rig.tmp_path), max_body_bytes=4096)
    url = f"http://127.0.0.1:{router.port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({}, b'{"model": "x"}', 401, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, b'{"model": "x"}', 401, "invalid_api_key"),
        (auth, b'{"model": ', 400, "invalid_json"),
        (auth, b"[1, 2]", 400, "invalid_request"),
        (auth, b'{"model": "nobody-serves-this"}', 404, "model_not_found"),
        (auth, b'{"model": "%s"}' % b"x" * 5000, 413, "body_too_large"),
    ]
    async with aiohttp.ClientSession() as http:
        for headers, body, status, code in cases:
            async with http.post(url, data=body, headers=headers) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"]) == (status, code), error
                assert error["type"] and error["message"]
    # Known model, no ready replica: 503.
    rig.listing.deployments[0].replica_views[0].state = "starting"
    await async_wait_for(lambda: not router.table.ready, 5)
    with pytest.raises(openai.APIStatusError) as err:
        await rig.client(router).chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.status_code == 503 and err.value.body["code"] == "no_ready_replica"
    assert rig.forwarded() == 0
    errors = {m.name: m for m in router.metrics()}["gpud_router_errors_total"].samples
    assert {s[0]["code"] for s in errors} >= {
        "invalid_api_key",
        "invalid_json",
        "model_not_found",
        "body_too_large",
    }


async def test_slow_clients_are_cut_off_and_the_router_keeps_serving(rig: Rig) -> None:
    await rig.replica("a")
    router = await rig.router(idle_timeout_s=1.0, body_timeout_s=1.0)
    client = rig.client(router)
    # Slow headers: never completes the request line; closed by the idle/header timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    # Slow body: full headers, a body that trickles in too slowly.
    body_reader, body_writer = await asyncio.open_connection("127.0.0.1", router.port)
    body_writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        b'Content-Type: application/json\r\n\r\n{"model": '
    )
    await body_writer.drain()
    # Meanwhile others are served.
    reply = await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.id.startswith("a-")
    # (aiohttp then lingers a bounded while for the rest of the body before it closes.)
    head = await asyncio.wait_for(body_reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    assert b"body_timeout" in await asyncio.wait_for(body_reader.read(200), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
    body_writer.close()
    assert rig.states["a"].count == 1


async def test_a_client_that_goes_away_cancels_the_upstream_request(rig: Rig) -> None:
    state = await rig.replica("a", delay_s=0.3, chunks=20)
    router = await rig.router()
    client = rig.client(router)
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await async_wait_for(lambda: state.cancelled == 1 and state.in_flight == 0, 5)
    await async_wait_for(lambda: not router.stats.in_flight, 5)


async def test_per_source_connection_cap_and_a_bad_keys_file(rig: Rig) -> None:
    await rig.replica("a")
    path = keys_file(rig.tmp_path, mode=0o666)  # others may add keys: refused
    router = await rig.router(max_connections_per_source=2, api_keys_file=path)
    assert [p.code for p in router.problems()] == ["router.keys_refused"]
    with pytest.raises(openai.AuthenticationError):
        await rig.client(router).chat.completions.create(model=MODEL, messages=CHAT)
    held = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(2)]
    reader, _ = await asyncio.open_connection("127.0.0.1", router.port)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    for _, w in held:
        w.close()
    os.chmod(path, 0o600)  # fixed: loaded on the next refresh, no restart
    await async_wait_for(lambda: not router.problems(), 5)
    reply = await rig.client(router).chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.id.startswith("a-") and rig.forwarded() == 1


async def test_tls_listener_serves_a_client_that_trusts_its_ca_and_refuses_a_shared_key(
    rig: Rig,
) -> None:
    await rig.replica("a")
    ca, cert, key = tls_files(rig.tmp_path)
    router = await rig.router(tls_cert=cert, tls_key=key)
    assert router.status().tls and "(TLS)" in router.summary()
    trusting = openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{router.port}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpx2Client(verify=ssl.create_default_context(cafile=ca)),
    )
    rig._stack.push_async_callback(trusting.close)
    reply = await trusting.chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.id.startswith("a-")
    # A client that does not trust the CA, and one speaking plain HTTP, get nothing through.
    untrusting = openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{router.port}/v1", api_key="unused", max_retries=0
    )
    rig._stack.push_async_callback(untrusting.close)
    with pytest.raises(openai.APIConnectionError):
        await untrusting.chat.completions.create(model=MODEL, messages=CHAT)
    with pytest.raises(openai.APIConnectionError):
        await rig.client(router).chat.completions.create(model=MODEL, messages=CHAT)
    assert rig.states["a"].count == 1
    # A key every user may read is refused: that router does not listen at all (no plain
    # HTTP in its place), and says why.
    os.chmod(key, 0o644)
    config = config_for("tls-bad", rig.tmp_path, {"router": {
        "enabled": True, "listen": "127.0.0.1", "port": free_port(), "tls_cert": cert,
        "tls_key": key}})  # fmt: skip
    refused = RouterService(config, lambda: rig.listing)
    task = asyncio.create_task(refused.run())
    try:
        await async_wait_for(lambda: refused.problems(), 5, what="the TLS refusal")
        assert [p.code for p in refused.problems()] == ["router.tls_refused"]
        assert refused.status().state == "not listening" and "0644" in refused.status().error
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
