"""`gpud gpus`: each GPU's verdict and repair action; `gpud gpus lease` / `gpud gpus release`."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from gpud.client import (
    api_call,
    api_exchange,
    api_get,
    client_command,
    client_options,
    path_part,
    print_raw_json,
)
from gpud.text import escape, table


class GpuView(msgspec.Struct, kw_only=True):
    """What `gpud gpus` prints of one GPU (gpud.gpus.service.GpuStatus)."""

    index: int
    uuid: str
    state: str
    reason: str
    action: str
    fix: str
    lease: str | None = None


class GpuLeaseView(msgspec.Struct, kw_only=True):
    """A GPU lease (gpud.gpus.leases.GpuLease)."""

    id: str
    owner: str
    gpus: list[str]
    pid: int | None = None


class GpusView(msgspec.Struct, kw_only=True):
    """What `gpud gpus` prints of GET /v1/gpus (gpud.gpus.service.GpusDetail, whose module
    loads aiohttp and NVML: a client command does not)."""

    summary: str
    state: str
    action: str
    fix: str
    nvml: str
    driver_version: str | None = None
    cuda_version: str | None = None
    nvml_events: str
    kmsg: str
    gpus: list[GpuView] = []
    leases: list[GpuLeaseView] = []


def cmd_gpus(args: argparse.Namespace) -> int:
    if args.gpus_command == "lease":
        return cmd_lease(args)
    if args.gpus_command == "release":
        return cmd_release(args)
    data, raw = api_exchange(args, "GET", "/v1/gpus", type=GpusView)
    if args.json:
        print_raw_json(raw)
        return 0
    print(render_gpus(data))
    return 0


def render_gpus(data: GpusView) -> str:
    """Every string comes from NVML, the kernel log or a lease owner: all escaped."""
    lines = [
        escape(data.summary),
        f"nvml: {escape(data.nvml)}  driver: {escape(data.driver_version or '-')}  "
        f"cuda: {escape(data.cuda_version or '-')}",
        f"xid sources: nvml events {escape(data.nvml_events)}; kernel log {escape(data.kmsg)}",
    ]
    if data.gpus:
        lines.append(
            table(
                ["GPU", "UUID", "STATE", "LEASE", "REASON"],
                [
                    [
                        str(g.index),
                        *(escape(x) for x in (g.uuid, g.state, g.lease or "-", g.reason)),
                    ]
                    for g in data.gpus
                ],
                right=[0],
            )
        )
        lines += [
            f"    GPU {g.index} fix: {escape(g.fix)} (repair action: {escape(g.action)})"
            for g in data.gpus
            if g.state != "healthy"
        ]
    if data.state != "healthy":
        lines.append(
            f"node {escape(data.state)}: fix: {escape(data.fix)} "
            f"(repair action: {escape(data.action)})"
        )
    lines += [
        f"lease {escape(lease.id)} {escape(lease.owner)} pid={lease.pid or '-'}: "
        f"{escape(','.join(lease.gpus))}"
        for lease in data.leases
    ]
    return "\n".join(lines)


def cmd_lease(args: argparse.Namespace) -> int:
    body = {"owner": args.owner, "count": args.count, "pid": args.pid}
    lease, raw = api_exchange(args, "POST", "/v1/gpus/leases", body, GpuLeaseView)
    if args.json:
        print_raw_json(raw)
        return 0
    # Engines int() CUDA_VISIBLE_DEVICES entries, so scripts need the NVML indices too:
    # `export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$(gpud gpus lease ... | cut -f3)`.
    index = {g.uuid: g.index for g in api_get(args, "/v1/gpus", GpusView).gpus}
    indices = ",".join(str(index[u]) for u in lease.gpus if u in index)
    print(f"{escape(lease.id)}\t{escape(','.join(lease.gpus))}\t{indices}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    api_call(args, "DELETE", f"/v1/gpus/leases/{path_part(args.lease_id)}")
    return 0


def add_commands(sub: Any) -> None:
    """Register `gpud gpus ...` on the top-level subparsers."""
    gpus = client_command(sub, "gpus", "this node's GPUs: health, repair actions, leases", cmd_gpus)
    actions = gpus.add_subparsers(dest="gpus_command", metavar="ACTION")
    lease = actions.add_parser(
        "lease",
        help="lease whole healthy GPUs; prints the lease id, the GPU UUIDs and their NVML "
        "indices (for CUDA_VISIBLE_DEVICES, with CUDA_DEVICE_ORDER=PCI_BUS_ID)",
    )
    lease.add_argument("--owner", required=True, help="who holds the lease (free text)")
    lease.add_argument("--count", type=int, required=True, help="number of GPUs")
    lease.add_argument(
        "--pid", type=int, default=None, help="owner process: the lease ends when it exits"
    )
    client_options(lease, nested=True)
    release = actions.add_parser("release", help="release a GPU lease by its id")
    release.add_argument("lease_id", metavar="ID")
    client_options(release, nested=True)
