"""`GET /v1/deployments/{name}/logs?replica=I&lines=N|offset=B[&ray=1]`: a replica server's output
file on this host, or with ``ray=1`` that of this host's Ray node of a multi-node replica
(gpud.logfiles reads it; `gpud deploy logs [--ray]` prints it).

A read endpoint like the other deployment views (any member of the socket's group). The file is
named from the validated deployment name and replica index only (the name the replica runtime
writes, `Replicas.log_path`), so no request reaches another path. Without ``replica`` the one
replica of the deployment this host has a file of, or runs, is meant; where the replica has no
file here the error says where it runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from gpud import api, logfiles
from gpud.deployments import spec
from gpud.deployments.replicas import RAY_GROUP_SUFFIX
from gpud.errors import ApiError

if TYPE_CHECKING:
    from gpud.deployments.model import DeploymentView

# A spec holds at most 256 replicas (gpud.deployments.spec).
MAX_REPLICA = 255


def replica_index(raw: str | None) -> int | None:
    """``?replica=`` as an index, None when absent; ApiError(400) when it is not one."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_REPLICA:
        raise ApiError(400, f"replica must be an index from 0 to {MAX_REPLICA}, not {raw[:32]!r}")
    return int(raw)


def pick_replica(
    view: DeploymentView,
    node: str,
    index: int | None,
    has_file: Callable[[int], bool],
    *,
    ray: bool = False,
) -> int:
    """The replica index a request on ``node`` means: ``index``, or the one replica of the
    deployment this node runs (``ray``: is a node of) or has a file of; ApiError(404/400)
    saying why there is none."""
    name = view.name
    if ray and view.nodes_per_replica == 1:
        raise ApiError(400, f"{name} runs replicas of one node: they have no Ray node of their own")
    if index is not None:
        found = next((r for r in view.replica_views if r.index == index), None)
        if has_file(index):
            return index
        if found is None:
            raise ApiError(404, f"{name} has no replica {index} (replicas: {view.replicas})")
        if (node not in found.nodes) if ray else (found.node != node):
            hosts = ", ".join(found.nodes) if ray else found.node
            where = f"runs on {hosts}" if hosts else "is not placed on any host"
            raise ApiError(404, f"replica {name}.{index} {where}, not on this host: ask there")
        raise ApiError(404, f"replica {name}.{index} has written no log on this host yet")
    here = {r.index for r in view.replica_views if (node in r.nodes if ray else r.node == node)}
    candidates = sorted(here | {i for i in range(view.replicas) if has_file(i)})
    if len(candidates) == 1:
        return pick_replica(view, node, candidates[0], has_file, ray=ray)
    if candidates:
        listed = ", ".join(str(i) for i in candidates)
        raise ApiError(400, f"this host has several replicas of {name} ({listed}): name one")
    elsewhere = ", ".join(f"{name}.{r.index} on {r.node}" for r in view.replica_views if r.node)
    raise ApiError(
        404, f"no replica of {name} runs on this host" + (f" ({elsewhere})" if elsewhere else "")
    )


def route(
    view: Callable[[str], DeploymentView], node: str, log_path: Callable[[str], Path]
) -> web.RouteDef:
    """The route, over the service's view of a deployment, this node's name and the replica
    runtime's file names."""

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            msgspec.convert(name, spec.Name)  # the spec's own rule: no path can pass it
        except msgspec.ValidationError:
            raise ApiError(400, f"not a deployment name: {name[:64]!r}") from None
        found = view(name)  # 404 for an unknown deployment
        index = replica_index(request.query.get("replica"))
        ray = request.query.get("ray", "0")
        if ray not in ("0", "1"):
            raise ApiError(400, f"ray must be 0 or 1, not {ray[:32]!r}")
        suffix = RAY_GROUP_SUFFIX if ray == "1" else ""

        def has_file(i: int) -> bool:
            return log_path(f"{name}.{i}{suffix}").is_file()

        index = await asyncio.to_thread(
            functools.partial(pick_replica, found, node, index, has_file, ray=bool(suffix))
        )
        chunk = await asyncio.to_thread(
            logfiles.answer,
            request.query,
            log_path(f"{name}.{index}{suffix}"),
            f"replica {name}.{index} has written no log on this host yet",
        )
        return api.json_response(msgspec.structs.replace(chunk, replica=index))

    return web.get("/v1/deployments/{name}/logs", handler)
