"""Local authorization with real uids against a real gpud agent.

Throwaway users: a reader (socket group only) and two admins (socket group + admin group). The
clients run as those users (a forked child that drops to their uid and groups) and call the
local socket; the kernel's SO_PEERCRED / SO_PEERGROUPS decide, not anything the client says.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud import api, client
from gpud.errors import GpudError
from tests.harness.gpud_node import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


@pytest.fixture
def users() -> Iterator[dict[str, str]]:
    tag = f"gt{os.getpid() % 100000}"
    names = {
        "socket_group": f"{tag}s",
        "admin_group": f"{tag}a",
        "reader": f"{tag}r",
        "admin": f"{tag}x",
        "other_admin": f"{tag}y",
    }
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for group in (names["socket_group"], names["admin_group"]):
            subprocess.run(["groupadd", "--system", group], check=True)
            made_groups.append(group)
        for role in ("reader", "admin", "other_admin"):
            extra = [] if role == "reader" else ["-G", names["admin_group"]]
            subprocess.run(
                [
                    *("useradd", "--system", "-M", "-N", "-s", "/usr/sbin/nologin"),
                    *("-g", names["socket_group"], *extra, names[role]),
                ],
                check=True,
            )
            made_users.append(names[role])
        yield names
    finally:
        for user in made_users:
            subprocess.run(["userdel", user], check=False)
        for group in reversed(made_groups):
            subprocess.run(["groupdel", group], check=False)


def as_user(user: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` in a forked child as ``user`` (its uid, primary and supplementary groups)."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for good, answer through the pipe, never return
        try:
            os.setgroups(os.getgrouplist(user, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            out = json.dumps(call())
        except BaseException as exc:  # reported to the parent
            out = json.dumps({"child_error": repr(exc)})
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def call(sock: str, method: str, path: str, body: Any = None) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return [200, client.request(sock, method, path, body, timeout=10)]
        except client.ApiRefused as exc:
            return [exc.status, str(exc)]
        except GpudError as exc:
            return [0, str(exc)]

    return run


def test_readers_read_admins_lease_owners_release(cluster, users):
    nodes = cluster(
        1,
        overrides={
            "api": {"socket_group": users["socket_group"], "admin_group": users["admin_group"]}
        },
    )
    node = nodes[0]
    sock = node.socket
    for parent in Path(sock).parents:  # the harness's dirs are 0700: let the users traverse
        if parent in (Path("/tmp"), Path("/")):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    wait_for(lambda: node.api("/v1/ports")["state"] == "confirmed", 60, what="block confirmed")

    status, _ = as_user(users["reader"], call(sock, "GET", "/v1/ports"))
    assert status == 200
    status, message = as_user(
        users["reader"], call(sock, "POST", "/v1/ports/leases", {"owner": "r", "count": 1})
    )
    assert status == 403 and users["admin_group"] in message

    admin = pwd.getpwnam(users["admin"])
    # A lease pinned to a process the caller does not own (pid 1) would never be reclaimed.
    status, message = as_user(
        users["admin"],
        call(sock, "POST", "/v1/ports/leases", {"owner": "x", "count": 1, "pid": 1}),
    )
    assert status == 403 and "pid 1" in message
    sleeper = subprocess.Popen(["sleep", "120"], user=admin.pw_uid, group=admin.pw_gid)
    try:
        body = {
            "owner": "x",
            "count": 1,
            "pid": sleeper.pid,
            "uid": 0,
        }  # a uid in the body is ignored
        status, lease = as_user(users["admin"], call(sock, "POST", "/v1/ports/leases", body))
        assert status == 200, lease
        assert lease["uid"] == admin.pw_uid
        path = f"/v1/ports/leases/{lease['id']}"
        for other in ("other_admin", "reader"):
            status, message = as_user(users[other], call(sock, "DELETE", path))
            assert status == 403, (other, message)
        assert any(item["id"] == lease["id"] for item in node.api("/v1/ports/leases"))
        status, _ = as_user(users["admin"], call(sock, "DELETE", path))
        assert status == 200
        assert not any(item["id"] == lease["id"] for item in node.api("/v1/ports/leases"))
        # Root may release anyone's lease.
        status, lease = as_user(
            users["other_admin"], call(sock, "POST", "/v1/ports/leases", {"owner": "y", "count": 1})
        )
        assert status == 200
        client.request(sock, "DELETE", f"/v1/ports/leases/{lease['id']}")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_may_change_state_is_root_or_the_admin_group():
    creds = api.PeerCredentials(pid=10, uid=1000, gid=1000)
    assert api.may_change_state(api.PeerCredentials(pid=1, uid=0, gid=0), set(), None)
    assert not api.may_change_state(creds, {1000, 20}, None)
    assert not api.may_change_state(creds, {1000, 20}, 30)
    assert api.may_change_state(creds, {1000, 30}, 30)
    with contextlib.suppress(KeyError):
        assert grp.getgrnam("root").gr_gid == 0
