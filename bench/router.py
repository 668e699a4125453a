"""Router benchmark: the latency a router adds over calling a replica directly, and the
requests per second one router sustains, with a trivial OpenAI-shaped upstream on loopback.

The upstream and the router each run in their own process (as on a host: gpud and the
engine), the load comes from this one. Latency: sequential non-streaming chat completions,
direct and through the router (p50/p99 of each, and of the difference). Throughput: N
concurrent clients through the router for a fixed time.

    .venv/bin/python -m bench.router [--requests 2000] [--seconds 10] [--clients 64] [--json PATH]

`UpstreamState` / `upstream_app` are also the tests' replica (tests/router/test_router_proxy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from gpud.deployments.model import DeploymentsList, DeploymentView, ReplicaView
from tests.harness.wait import async_wait_for

MODEL = "bench-model"


# ---- the trivial upstream ------------------------------------------------------------------


class UpstreamState:
    """What a test replica did: requests by path, bodies seen, handlers cut short."""

    def __init__(self, name: str, *, delay_s: float = 0.0, chunks: int = 3) -> None:
        self.name = name
        self.delay_s = delay_s
        self.chunks = chunks
        self.draining = False
        self.waiting = 0.0  # reported as vllm:num_requests_waiting
        self.count = 0
        self.bodies: list[bytes] = []
        self.in_flight = 0
        self.cancelled = 0
        self.with_authorization = 0  # requests that brought an Authorization header


def _completion(state: UpstreamState, body: dict[str, Any], path: str) -> dict[str, Any]:
    ident = f"{state.name}-{state.count}"
    if path.endswith("/embeddings"):
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
            "model": body.get("model", ""),
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    if path.endswith("/chat/completions"):
        return {
            "id": ident,
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
    return {
        "id": ident,
        "object": "text_completion",
        "created": 0,
        "model": body.get("model", ""),
        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
    }


def _chunk(state: UpstreamState, body: dict[str, Any], path: str, i: int) -> dict[str, Any]:
    ident = f"{state.name}-{state.count}"
    if path.endswith("/chat/completions"):
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}],
        }
    return {
        "id": ident,
        "object": "text_completion",
        "created": 0,
        "model": body.get("model", ""),
        "choices": [{"index": 0, "text": f"t{i}", "finish_reason": None, "logprobs": None}],
    }


def upstream_app(state: UpstreamState) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text=f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {state.waiting}\n'
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": state.name, "count": state.count, "cancelled": state.cancelled}
        )

    async def generate(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if state.draining:
            return web.json_response({"error": "draining"}, status=503)
        state.bodies.append(raw)
        state.count += 1
        state.with_authorization += "Authorization" in request.headers
        body = json.loads(raw)
        state.in_flight += 1
        try:
            if not body.get("stream"):
                if state.delay_s:
                    await asyncio.sleep(state.delay_s)
                return web.json_response(_completion(state, body, request.path))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(state.chunks):
                await asyncio.sleep(state.delay_s)
                event = json.dumps(_chunk(state, body, request.path, i))
                await response.write(f"data: {event}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        finally:
            state.in_flight -= 1

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.get("/stats", stats),
            web.post("/v1/{tail:.*}", generate),
        ]
    )
    return app


async def serve_upstream(state: UpstreamState, host: str, port: int) -> web.AppRunner:
    """Start ``state``'s replica on host:port (port 0: any); its handlers are cancelled when
    the client goes, as vLLM aborts a request whose client went."""
    runner = web.AppRunner(upstream_app(state), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def listing_of(
    ports: dict[str, int], *, model: str = MODEL, name: str = "bench"
) -> DeploymentsList:
    """A deployments view with one ready replica per (node name -> loopback port): what the
    deployments component lists once this node's probes of them passed."""
    replicas = [
        ReplicaView(index=i, state="ready", node=node, addr="127.0.0.1", port=port, probe_ok=True)
        for i, (node, port) in enumerate(sorted(ports.items()))
    ]
    view = DeploymentView(
        name=name,
        version="1",
        origin="bench",
        digest="",
        engine="command",
        model=model,
        replicas=len(replicas),
        nodes_per_replica=1,
        gpus_per_node=0,
        health_path="/health",
        state="active",
        replica_views=replicas,
    )
    return DeploymentsList(node="bench", digest="", lamport=0, deployments=[view])


# ---- child processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run_upstream(port: int, name: str, delay_s: float) -> None:
    await serve_upstream(UpstreamState(name, delay_s=delay_s), "127.0.0.1", port)
    await asyncio.Event().wait()


async def _run_router(port: int, upstreams: dict[str, int]) -> None:
    from gpud.config import parse
    from gpud.router.service import RouterService

    config = parse(f'[router]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\n')
    listing = listing_of(upstreams)
    await RouterService(config, lambda: listing).run()


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.router", *args],
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )


async def wait_listening(port: int, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    async def listening() -> bool:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        return True

    await async_wait_for(listening, timeout, 0.1, what=f"a listener on 127.0.0.1:{port}")


# ---- load ------------------------------------------------------------------------------------

BODY = msgspec.json.encode(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
)


async def sequential(http: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status} from {url}")
        out.append(time.perf_counter() - t0)
    return out


async def sustained(url: str, clients: int, seconds: float) -> dict[str, float]:
    done = failed = 0
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status == 200:
                    done += 1
                else:
                    failed += 1

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.monotonic() - t0
    return {"requests": done, "failed": failed, "rps": round(done / elapsed, 1)}


def _ms(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1] * 1000, 3)


async def bench(requests: int, seconds: float, clients: int) -> dict[str, Any]:
    up_port, router_port = free_port(), free_port()
    children = [spawn("--serve-upstream", str(up_port))]
    try:
        await wait_listening(up_port)
        children.append(spawn("--serve-router", str(router_port), "--upstream-port", str(up_port)))
        await wait_listening(router_port)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        router_url = f"http://127.0.0.1:{router_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            await sequential(http, router_url, 200)  # warm both paths' pools
            await sequential(http, direct_url, 200)
            direct = await sequential(http, direct_url, requests)
            routed = await sequential(http, router_url, requests)
        load = await sustained(router_url, clients, seconds)
        direct_load = await sustained(direct_url, clients, seconds)
    finally:
        for child in children:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(10)
    return {
        "requests": requests,
        "direct_p50_ms": _ms(direct, 50),
        "direct_p99_ms": _ms(direct, 99),
        "router_p50_ms": _ms(routed, 50),
        "router_p99_ms": _ms(routed, 99),
        "added_p50_ms": round(_ms(routed, 50) - _ms(direct, 50), 3),
        "added_p99_ms": round(_ms(routed, 99) - _ms(direct, 99), 3),
        "clients": clients,
        "seconds": seconds,
        "router_rps": load["rps"],
        "router_failed": load["failed"],
        "direct_rps": direct_load["rps"],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-router", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="up", help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(_run_upstream(args.serve_upstream, args.name, args.delay))
        return
    if args.serve_router:
        asyncio.run(_run_router(args.serve_router, {"a": args.upstream_port}))
        return
    result = asyncio.run(bench(args.requests, args.seconds, args.clients))
    print("router vs direct, trivial upstream on loopback (sequential, non-streaming)")
    print(f"{'':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'direct':>8} {result['direct_p50_ms']:>8} {result['direct_p99_ms']:>8}")
    print(f"{'router':>8} {result['router_p50_ms']:>8} {result['router_p99_ms']:>8}")
    print(f"{'added':>8} {result['added_p50_ms']:>8} {result['added_p99_ms']:>8}")
    print(
        f"sustained, {result['clients']} clients for {result['seconds']:g} s: router "
        f"{result['router_rps']} req/s ({result['router_failed']} failed), direct "
        f"{result['direct_rps']} req/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
