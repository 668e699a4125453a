"""One component alone, without Serf: `python -m gpud.standalone {ports,gpus} CONFIG [ADDR]`.

The component is the only member of its cluster (``loopback_gossip``: it sees its own tags, so
a port claim settles alone) and serves only its own routes on the config's socket; it prints
"ready <socket>" once its ``ready()`` returns. Tests run it as a subprocess, to kill it as a
real gpud can be killed, or in-process through ``loopback_gossip`` and ``serve_unix``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Protocol

from aiohttp import web

from gpud import api, config, log
from gpud.context import Member, NodeContext
from gpud.tags import Tags


class Servable(Protocol):
    """The part of the component contract a standalone server uses."""

    async def run(self) -> None: ...

    async def ready(self) -> None: ...

    def routes(self) -> list[web.RouteDef]: ...


def loopback_gossip(ctx: NodeContext) -> None:
    """Make a node without Serf its own only member, seeing its own tags."""

    def show(tags: Tags) -> None:
        me = Member(
            name=ctx.node_name,
            addr=ctx.advertise_addr,
            port=ctx.config.serf.bind_port,
            status="alive",
            tags=tags,
        )
        ctx.set_members({ctx.node_name: me})

    async def publish(tags: Tags) -> None:
        show(tags)

    ctx.set_tag_publisher(publish)
    show(ctx.tags)


async def serve_unix(component: Servable, path: str) -> web.AppRunner:
    """Serve only ``component``'s routes on the Unix socket ``path``."""
    runner = web.AppRunner(api.make_app(component.routes()))
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


def build(kind: str, ctx: NodeContext) -> Servable:
    if kind == "ports":
        from gpud.ports.service import PortsService

        return PortsService(ctx)
    from gpud.gpus.service import GpuService

    return GpuService(ctx)


async def serve(kind: str, ctx: NodeContext) -> None:
    """Run the component ``kind`` on the config's socket until cancelled."""
    loopback_gossip(ctx)
    component = build(kind, ctx)
    runner = await serve_unix(component, ctx.config.socket_path)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(component.run())
            await component.ready()
            print(f"ready {ctx.config.socket_path}", flush=True)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpud.standalone", description=__doc__)
    parser.add_argument("kind", choices=["ports", "gpus"])
    parser.add_argument("config", help="gpud config file")
    parser.add_argument("addr", nargs="?", default="127.0.0.1", help="advertised address")
    args = parser.parse_args(argv)
    ctx = NodeContext(config.load(args.config), args.addr)
    log.setup("warning")
    asyncio.run(serve(args.kind, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
