"""Reading the children's output files (gpud.logfiles, gpud.deployments.logs): the tail and
follow reads against real files (bounded, whole lines, across a rotation), the validation of
what a request names (deployment name, replica index, lines, offset: never another path), which
replica a request on a host means, and the route in process over aiohttp."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from gpud import api, logfiles
from gpud.deployments import logs
from gpud.deployments.model import DeploymentView, ReplicaView
from gpud.errors import ApiError


def reference_tail(data: bytes, n: int) -> bytes:
    """The last ``n`` lines of ``data``, splitting on b"\\n" only (a last line may lack it)."""
    return b"".join(re.findall(rb"[^\n]*\n|[^\n]+$", data)[-n:]) if n > 0 else b""


@given(st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"\n")), st.integers(-2, 30))
def test_tail_is_the_last_lines(data: bytes, n: int) -> None:
    assert logfiles.tail(data, n) == reference_tail(data, n)


@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"x")), max_size=40),
    st.integers(1, 50),
    st.integers(1, 200),
)
def test_read_tail_is_bounded_and_never_starts_mid_line(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], n: int, bound: int
) -> None:
    path = tmp_path_factory.mktemp("tail") / "x.log"
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(data)
    text, end, truncated = logfiles.read_tail(path, n, bound)
    assert end == len(data) and len(text) <= bound
    wanted = reference_tail(data, n)
    if truncated:
        # The bound cut the lines asked for: a suffix of them, starting at a line's start.
        assert wanted.endswith(text) and len(text) < len(wanted)
        assert text == b"" or data[len(data) - len(text) - 1 : len(data) - len(text)] == b"\n"
    else:
        assert text == wanted


def test_read_since_follows_whole_lines_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "deploy-llm.0.log"
    path.write_bytes(b"one\ntw")
    text, offset, more = logfiles.read_since(path, 0)
    # A line still being written waits for its newline.
    assert (text, offset, more) == (b"one\n", 4, False)
    with path.open("ab") as f:
        f.write(b"o\nthree\n")
    assert logfiles.read_since(path, offset) == (b"two\nthree\n", 14, False)
    # gpud rotated it (copied to .1, emptied) and the child wrote on: read from its start.
    path.write_bytes(b"four\n")
    assert logfiles.read_since(path, 14) == (b"four\n", 5, False)
    # More than one reply holds: whole lines up to the bound, and "more" to ask again at once.
    path.write_bytes(b"a" * 10 + b"\n" + b"b" * 10 + b"\n")
    assert logfiles.read_since(path, 0, 15) == (b"a" * 10 + b"\n", 11, True)
    assert logfiles.read_since(path, 11, 15) == (b"b" * 10 + b"\n", 22, False)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"lines": "0"}, "lines must be from 1 to 10000, not 0"),
        ({"lines": "10001"}, "lines must be from 1 to 10000"),
        ({"lines": "ten"}, "lines must be a whole number"),
        ({"offset": "-1"}, "offset must be from 0"),
        ({"offset": "1.5"}, "offset must be a whole number"),
    ],
)
def test_answer_refuses_bad_bounds(tmp_path: Path, query: dict[str, str], error: str) -> None:
    (tmp_path / "x.log").write_text("a\n")
    with pytest.raises(ApiError, match=re.escape(error)) as raised:
        logfiles.answer(query, tmp_path / "x.log", "none")
    assert raised.value.status == 400


def test_answer_tail_then_follow_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "ray.log"
    path.write_text("".join(f"line {i}\n" for i in range(300)))
    first = logfiles.answer({"lines": "2"}, path, "none")
    assert first.text == "line 298\nline 299\n" and first.offset == path.stat().st_size
    with path.open("a") as f:
        f.write("line 300\n")
    later = logfiles.answer({"offset": str(first.offset)}, path, "none")
    assert later.text == "line 300\n" and later.file == "ray.log"
    with pytest.raises(ApiError, match="no log here") as raised:
        logfiles.answer({}, tmp_path / "absent.log", "no log here")
    assert raised.value.status == 404


@pytest.mark.parametrize("raw", ["-1", "256", "1e3", "../0", "0x1", "\u0663", " 1", ""])
def test_replica_index_refuses_anything_but_an_index(raw: str) -> None:
    with pytest.raises(ApiError) as raised:
        logs.replica_index(raw)
    assert raised.value.status == 400


def view(*replicas: tuple[int, str, list[str]]) -> DeploymentView:
    return DeploymentView(
        name="llm",
        version="1@a",
        origin="a",
        digest="d",
        engine="vllm",
        model="m",
        replicas=len(replicas),
        nodes_per_replica=1,
        gpus_per_node=1,
        health_path="/health",
        state="active",
        replica_views=[
            ReplicaView(index=i, state="ready", node=node, nodes=nodes)
            for i, node, nodes in replicas
        ],
    )


def test_pick_replica_says_where_a_replica_is() -> None:
    two = view((0, "a", ["a"]), (1, "b", ["b", "c"]))
    none: Any = lambda i: False  # noqa: E731
    assert logs.pick_replica(two, "a", None, lambda i: i == 0) == 0
    # A file left by a replica that moved away is still shown.
    assert logs.pick_replica(two, "c", 0, lambda i: i == 0) == 0
    cases = [
        ("c", 1, none, "replica llm.1 runs on b, not on this host"),
        ("b", 1, none, "replica llm.1 has written no log on this host yet"),
        ("a", 0, none, "has written no log on this host yet"),
        ("a", 7, none, "llm has no replica 7"),
        ("c", None, none, "no replica of llm runs on this host (llm.0 on a, llm.1 on b)"),
        ("a", None, lambda i: True, "several replicas of llm (0, 1): name one"),
    ]
    for node, index, has_file, error in cases:
        with pytest.raises(ApiError, match=re.escape(error)):
            logs.pick_replica(two, node, index, has_file)


def test_pick_replica_of_a_ray_node_counts_every_host_of_the_replica() -> None:
    pair = view((0, "a", ["a", "b"]), (1, "c", ["c", "d"]))
    pair.nodes_per_replica = 2
    none: Any = lambda i: False  # noqa: E731
    # The worker host of replica 0 has its Ray node's file, and means that replica.
    assert logs.pick_replica(pair, "b", None, lambda i: i == 0, ray=True) == 0
    cases = [
        ("b", 1, none, "replica llm.1 runs on c, d, not on this host"),
        ("b", 0, none, "replica llm.0 has written no log on this host yet"),
        ("e", None, none, "no replica of llm runs on this host"),
    ]
    for node, index, has_file, error in cases:
        with pytest.raises(ApiError, match=re.escape(error)):
            logs.pick_replica(pair, node, index, has_file, ray=True)
    single = view((0, "a", ["a"]))
    with pytest.raises(ApiError, match="no Ray node of their own"):
        logs.pick_replica(single, "a", 0, lambda i: True, ray=True)


async def test_route_reads_only_the_named_replicas_file(tmp_path: Path) -> None:
    (tmp_path / "deploy-llm.0.log").write_text("INFO serving\n")
    (tmp_path / "secret").write_text("not a log\n")
    deployments = {"llm": view((0, "a", ["a"]))}

    def get_view(name: str) -> DeploymentView:
        if name not in deployments:
            raise ApiError(404, f"no deployment named {name!r}")
        return deployments[name]

    app = web.Application(middlewares=[api.errors_as_json])
    app.add_routes([logs.route(get_view, "a", lambda rid: tmp_path / f"deploy-{rid}.log")])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        ok = await client.get("/v1/deployments/llm/logs")
        assert ok.status == 200
        body = await ok.json()
        assert body["text"] == "INFO serving\n" and body["replica"] == 0
        for path, status in [
            ("/v1/deployments/..%2Fsecret/logs", 400),
            ("/v1/deployments/LLM/logs", 400),
            ("/v1/deployments/llm/logs?replica=..%2F..%2Fsecret", 400),
            ("/v1/deployments/other/logs", 404),
            ("/v1/deployments/llm/logs?lines=100000", 400),
            ("/v1/deployments/llm/logs?ray=..%2Fsecret", 400),
            ("/v1/deployments/llm/logs?ray=1", 400),  # replicas of one node: no Ray node
        ]:
            reply = await client.get(path)
            assert reply.status == status, (path, await reply.text())
            assert "not a log" not in await reply.text()
        # A replica of two nodes: this host's Ray node of it writes its own file.
        (tmp_path / "deploy-llm.0.ray.log").write_text("INFO raylet started\n")
        deployments["llm"].nodes_per_replica = 2
        ray = await (await client.get("/v1/deployments/llm/logs?ray=1")).json()
        assert ray["text"] == "INFO raylet started\n" and ray["replica"] == 0
        server = await (await client.get("/v1/deployments/llm/logs?ray=0")).json()
        assert server["text"] == "INFO serving\n"


async def test_cli_follows_a_growing_log_until_ctrl_c(tmp_path: Path) -> None:
    """`gpud deploy logs NAME -f` as a real process against the route on a Unix socket: the last
    lines, then lines written later (also after a rotation), and exit 0 on Ctrl-C (SIGINT)."""
    log = tmp_path / "deploy-llm.0.log"
    log.write_text("".join(f"old {i}\n" for i in range(5)))
    app = web.Application(middlewares=[api.errors_as_json])
    app.add_routes(
        [
            logs.route(
                lambda name: view((0, "a", ["a"])), "a", lambda r: tmp_path / f"deploy-{r}.log"
            )
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "gpud.sock")
    await web.UnixSite(runner, sock).start()
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpud",
        "deploy",
        "logs",
        "llm",
        "-n",
        "2",
        "-f",
        "--socket",
        sock,
        stdout=asyncio.subprocess.PIPE,
        # As from a terminal: a suite started in the background (`cmd &` in a script) has
        # SIGINT ignored, the child would inherit that, and Python would then leave Ctrl-C
        # ignored too (as it should for a background job).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert cli.stdout is not None
    try:
        seen = [(await asyncio.wait_for(cli.stdout.readline(), 30)).decode() for _ in range(2)]
        assert seen == ["old 3\n", "old 4\n"]
        with log.open("a") as f:
            f.write("new \x1b[31m1\n")
        line = await asyncio.wait_for(cli.stdout.readline(), 30)
        assert line.decode() == "new \\x1b[31m1\n"  # escaped: a log cannot drive the terminal
        log.write_text("rotated 1\n")  # gpud's rotation empties the file
        assert await asyncio.wait_for(cli.stdout.readline(), 30) == b"rotated 1\n"
        cli.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(cli.wait(), 30) == 0
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
        await runner.cleanup()
