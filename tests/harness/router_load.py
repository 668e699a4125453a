"""Load through one gpud router with the real `openai` client, run inside a harness host.

    router_load.py --base http://ADDR:PORT/v1 --model M --seconds S --workers W [--session ID]
                   [--stop-file PATH]

Each worker sends requests back to back for ``--seconds`` or until ``--stop-file`` exists,
whichever comes first (completions and chat, every other
one streamed), with the client's own retries off so every failure is the router's. One JSON
line per request on stdout: when it was sent and finished (wall clock: every namespace shares
the kernel's), whether it succeeded, and which replica served it (the stand-in server's
``system_fingerprint``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import openai


def one(client: openai.OpenAI, model: str, n: int, session: str) -> str:
    """One request, kind by ``n``; the replica that served it."""
    headers = {"x-session-id": session} if session else {}
    stream = n % 2 == 1
    if n % 4 < 2:
        reply = client.completions.create(
            model=model, prompt="hi", max_tokens=4, stream=stream, extra_headers=headers
        )
    else:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=stream,
            extra_headers=headers,
        )
    if not stream:
        return reply.system_fingerprint or ""
    chunks = list(reply)
    if not chunks:
        raise RuntimeError("an empty stream")
    return chunks[-1].system_fingerprint or ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--session", default="")
    parser.add_argument("--stop-file", type=Path, default=None)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base, api_key="unused", max_retries=0, timeout=15.0)
    counter = itertools.count()
    lock = threading.Lock()
    end = time.monotonic() + args.seconds

    def worker() -> None:
        while time.monotonic() < end and not (args.stop_file and args.stop_file.exists()):
            n = next(counter)
            sent = time.time()
            record: dict[str, object] = {"sent": sent, "ok": True}
            try:
                record["replica"] = one(client, args.model, n, args.session)
            # Any exception is a failed request (a stream cut mid-way surfaces as the HTTP
            # library's error, not the client's): its type is recorded.
            except Exception as exc:
                record |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            record["done"] = time.time()
            with lock:
                print(json.dumps(record), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
