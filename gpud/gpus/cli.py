"""`gpud gpus`: each GPU's verdict and repair action; `gpud gpus lease` / `gpud gpus release`."""

from __future__ import annotations

import argparse
from typing import Any

from gpud.client import api_call, api_get, client_command, client_options, print_json


def cmd_gpus(args: argparse.Namespace) -> int:
    if args.gpus_command == "lease":
        return cmd_lease(args)
    if args.gpus_command == "release":
        return cmd_release(args)
    data = api_get(args, "/v1/gpus")
    if args.json:
        print_json(data)
        return 0
    print(data.get("summary", "-"))
    print(
        f"nvml: {data.get('nvml')}  driver: {data.get('driver_version') or '-'}  "
        f"cuda: {data.get('cuda_version') or '-'}"
    )
    print(f"xid sources: nvml events {data.get('nvml_events')}; kernel log {data.get('kmsg')}")
    gpus = data.get("gpus", [])
    if gpus:
        print(f"{'GPU':>3} {'UUID':<42} {'STATE':<9} {'LEASE':<17} REASON")
        for gpu in gpus:
            print(
                f"{gpu['index']:>3} {gpu['uuid']:<42} {gpu['state']:<9} "
                f"{gpu.get('lease') or '-':<17} {gpu['reason']}"
            )
            if gpu["state"] != "healthy":
                print(f"{'':>4}fix: {gpu['fix']} (repair action: {gpu['action']})")
    if data.get("state") not in (None, "healthy"):
        print(f"node {data['state']}: fix: {data.get('fix')} (repair action: {data.get('action')})")
    for lease in data.get("leases", []):
        print(
            f"lease {lease['id']} {lease['owner']} pid={lease.get('pid') or '-'}: "
            f"{','.join(lease['gpus'])}"
        )
    return 0


def cmd_lease(args: argparse.Namespace) -> int:
    body = {"owner": args.owner, "count": args.count, "pid": args.pid}
    lease = api_call(args, "POST", "/v1/gpus/leases", body)
    if args.json:
        print_json(lease)
        return 0
    # Engines int() CUDA_VISIBLE_DEVICES entries, so scripts need the NVML indices too:
    # `export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$(gpud gpus lease ... | cut -f3)`.
    index = {g["uuid"]: g["index"] for g in api_get(args, "/v1/gpus").get("gpus", [])}
    indices = ",".join(str(index[u]) for u in lease["gpus"] if u in index)
    print(f"{lease['id']}\t{','.join(lease['gpus'])}\t{indices}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    api_call(args, "DELETE", f"/v1/gpus/leases/{args.lease_id}")
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
