"""The `command` engine's test server: a tiny OpenAI-style HTTP server (no GPU, no vLLM).

Run by gpud as a replica: ``deploy_server.py --port {port} --host {host_ip} --model {model}``.
Serves GET /health (200), GET /metrics (vLLM's ``vllm:num_requests_running`` and
``..._waiting``) and GET /v1/models, and reports what gpud gave it (CUDA_VISIBLE_DEVICES,
NCCL_SOCKET_IFNAME) under /v1/models so tests can check the environment end to end. POST
/v1/completions and /v1/chat/completions (``stream: true``: server-sent events ending in
``data: [DONE]``) answer after ``--delay-s`` (or the body's ``delay_s``) with
``system_fingerprint`` set to the replica's ``host:port``, so a test behind a router sees which
replica served each request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def join_ray(nodes: int) -> None:
    """Connect to the replica's own Ray cluster and wait (bounded) for its ``nodes`` nodes."""
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    for _ in range(600):
        if len(ray_info()["nodes"]) >= nodes:
            return
        time.sleep(0.5)
    raise SystemExit(f"the Ray cluster did not reach {nodes} nodes")


def ray_info() -> dict[str, object]:
    """The replica's Ray cluster now: its alive nodes' addresses and IDs (a node that rejoins
    at the same address gets a new one), and their GPUs."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    return {
        "address": os.environ["RAY_ADDRESS"],
        "nodes": sorted(n["NodeManagerAddress"] for n in alive),
        "node_ids": sorted(n["NodeID"] for n in alive),
        "gpus": sum(n["Resources"].get("GPU", 0) for n in alive),
    }


class JsonHandler(BaseHTTPRequestHandler):
    """What every stand-in server's handler shares: JSON replies, no access log."""

    def _reply(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass  # probes every second would flood gpud's log


def serve(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
    ThreadingHTTPServer((host, port), handler).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--model", default="test-model")
    parser.add_argument(
        "--ray-nodes",
        type=int,
        default=0,
        help="join the replica's Ray cluster (RAY_ADDRESS) and serve only once it has this many "
        "alive nodes",
    )
    parser.add_argument("--delay-s", type=float, default=0.0, help="time each completion takes")
    parser.add_argument(
        "--sleep-before-listen",
        type=float,
        default=0.0,
        help="say so on stdout, then sleep this long before listening (a model that loads slowly)",
    )
    parser.add_argument(
        "--hang-completions-after",
        type=int,
        default=0,
        help="answer this many completions, then hang every later one while /health stays "
        "green (a server whose workers died)",
    )
    args = parser.parse_args()
    completions = itertools.count(1)
    # Completions being answered, reported as vLLM reports its own (/metrics).
    running = [0]
    lock = threading.Lock()
    replica = f"{args.host}:{args.port}"
    if args.ray_nodes:
        join_ray(args.ray_nodes)
    if args.sleep_before_listen:
        print(f"loading: listening in {args.sleep_before_listen:g} s", flush=True)
        time.sleep(args.sleep_before_listen)

    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            elif self.path == "/metrics":
                text = (
                    f'vllm:num_requests_running{{model_name="{args.model}"}} {running[0]}\n'
                    f'vllm:num_requests_waiting{{model_name="{args.model}"}} 0\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            elif self.path == "/v1/models":
                self._reply(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": args.model, "object": "model"}],
                        "gpud": {
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "nccl_socket_ifname": os.environ.get("NCCL_SOCKET_IFNAME"),
                            "vllm_host_ip": os.environ.get("VLLM_HOST_IP"),
                            "pid": os.getpid(),
                            "ray": ray_info() if args.ray_nodes else {},
                        },
                    },
                )
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            with lock:
                running[0] += 1
            try:
                self._complete()
            finally:
                with lock:
                    running[0] -= 1

        def _complete(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                self._reply(404, {"error": "not found"})
                return
            if args.hang_completions_after and next(completions) > args.hang_completions_after:
                print("a worker died: completions hang", flush=True)
                time.sleep(3600)  # until gpud stops the server
            # A request may ask to take longer (a long generation, in drain tests).
            time.sleep(float(body.get("delay_s", args.delay_s)))
            kind = "chat.completion" if chat else "text_completion"
            choice: dict[str, object] = {"index": 0, "finish_reason": "stop"}
            if not body.get("stream"):
                choice |= (
                    {"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
                )
                self._reply(200, self._envelope(kind, choice))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            choice |= {"delta": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
            chunk = self._envelope(f"{kind}.chunk" if chat else kind, choice)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

        def _envelope(self, kind: str, choice: dict[str, object]) -> dict[str, object]:
            return {
                "id": f"cmpl-{os.urandom(8).hex()}",
                "object": kind,
                "created": int(time.time()),
                "model": args.model,
                "system_fingerprint": replica,
                "choices": [choice],
            }

    serve(args.host, args.port, Handler)


if __name__ == "__main__":
    main()
