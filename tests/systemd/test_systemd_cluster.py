"""Two hosts under a real systemd, one Debian 12 and one Debian 13: the README's quick start
followed as written gives one cluster, and a replica keeps serving, with the same server pid and
port, across `systemctl restart gpud` and an upgrade of the package on its host.

Each host is a root of tests/harness/nspawn.py booted inside a host namespace of the harness
network (tests/harness/netns.py: one bridge, 10.77.<k>.0/24, connected to nothing else), with a
default route as a real host has. The quick start (README, "Install from the deb or rpm"), not
pre-seeded: install the deb on both, copy A's generated key to B and restart B's gpud, set
B's `serf.retry_join` to A and restart, `systemctl enable --now gpud`, then `gpud status`.

Then the operator trusts a deployment key on both hosts, turns on B's router and cordons B, and
applies R=1 of the stand-in server (tests/harness/deploy_server.py, run by the host's own
/usr/bin/python3) from A. Clients in B's namespace send requests back to back with the real
`openai` client (tests/harness/router_load.py) straight to A's replica and through B's router,
while A's gpud is restarted with systemctl and then upgraded with apt-get: not one request
fails, the server keeps its pid and port, every other process of the unit's cgroup (serf and
the server) is the same one, and B never lists A as anything but alive. Ray is not installed in
these roots (it is not part of the package): its adoption across a gpud restart is shown in the
harness (tests/netns/test_adopt_ray_netns.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.deployments import authority
from tests.harness.deployments import SERVER
from tests.harness.netns import Host, Network
from tests.harness.nspawn import Machine
from tests.harness.router_cluster import background_load, records

pytestmark = [pytest.mark.nspawn, pytest.mark.netns, pytest.mark.timeout(1200)]

MODEL = "test-model"
ROUTER_PORT = 7950
CONFIG = "/etc/gpud/gpud.toml"
SERVER_IN_ROOT = "/usr/local/lib/gpud-test/deploy_server.py"
# Load between the steps, so that each step's requests land in a window of their own.
SETTLE_S = 3.0


class Host2(Machine):
    """A booted root in a harness host's namespace: its address there."""

    def __init__(self, workdir: Path, suite: str, host: Host, name: str, debs: tuple[Path, Path]):
        super().__init__(workdir, suite, netns=host.netns, hostname=name, debs=debs)
        self.host = host
        self.name = name
        self.addr = host.addr

    def json(self, args: str) -> Any:
        return json.loads(self.sh(f"gpud {args} --json", timeout=30).stdout)

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.json("members")["members"]}

    def serving(self) -> tuple[int, int] | None:
        """(pid, port) of the replica's server once it is ready here."""
        reply = self.sh("gpud deploy --json status solo", check=False, timeout=30)
        if reply.returncode != 0:
            return None
        views = json.loads(reply.stdout)["replica_views"]
        ready = [v for v in views if v["state"] == "ready"]
        return (ready[0]["pid"], ready[0]["port"]) if ready else None

    def unit_processes(self) -> set[int]:
        """The pids of gpud.service's cgroup other than gpud's own."""
        listed = self.sh(
            "for f in /proc/[0-9]*/cgroup; do grep -qs '/gpud.service$' $f && echo ${f%/cgroup}; done; true"
        ).stdout.split()
        return {int(p.removeprefix("/proc/")) for p in listed} - {int(self.show("MainPID"))}


def _wait(check: Any, timeout: float, what: str, describe: Any = None) -> Any:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout} s\n{describe() if describe else ''}")


@pytest.fixture
def hosts(
    debs: tuple[Path, Path], _harness_leftovers_removed: None
) -> Iterator[tuple[Host2, Host2]]:
    workdir = Path(tempfile.mkdtemp(prefix="gpud-nspawn-cluster-"))
    booted: list[Host2] = []
    with Network(2) as network:
        try:
            for i, (host, suite) in enumerate(zip(network, ("bookworm", "trixie"), strict=True)):
                # A real host has a default route (advertise = "auto" takes its interface).
                host.ip("route", "add", "default", "via", str(network.subnet.network_address + 1))
                booted.append(Host2(workdir / host.name, suite, host, f"gpud-{'ab'[i]}", debs))
            yield booted[0], booted[1]
        finally:
            for machine in booted:
                machine.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _both_alive(machine: Host2, names: set[str]) -> bool:
    reply = machine.sh("gpud members --json", check=False, timeout=30)
    if reply.returncode != 0:
        return False
    members = json.loads(reply.stdout)["members"]
    return {m["name"] for m in members if m["status"] == "alive" and not m["down"]} == names


def _quick_start(a: Host2, b: Host2) -> None:
    """README's steps, not pre-seeded, on A and B."""
    for m in (a, b):
        m.sh(f"apt-get install -y {m.deb(1)} </dev/null", timeout=180)
        m.wait("systemctl is-active -q gpud", 15, f"gpud active on {m.name} after install")
    # Step 3: one cluster key on every host, then restart (enable --now would not).
    key = (a.root / "etc/gpud/cluster.key").read_text()
    assert key != (b.root / "etc/gpud/cluster.key").read_text()  # each install made its own
    (b.root / "root/cluster.key").write_text(key)
    b.sh("install -m 0600 -o gpud -g gpud /root/cluster.key /etc/gpud/cluster.key && "
         "rm /root/cluster.key && systemctl restart gpud")  # fmt: skip
    # Step 4: retry_join to the other host, then restart.
    b.sh(f"sed -i 's/^# retry_join = \\[\\] /retry_join = [\"{a.addr}\"] /' {CONFIG} && "
         f"grep -q '^retry_join = \\[\"{a.addr}\"\\]' {CONFIG} && systemctl restart gpud")  # fmt: skip
    # Step 5 and 6.
    for m in (a, b):
        m.sh("systemctl enable --now gpud")
    for m in (a, b):
        _wait(lambda m=m: _both_alive(m, {a.name, b.name}), 60, f"one cluster seen from {m.name}",
              lambda m=m: m.sh("gpud status; gpud doctor", check=False).stdout + m.journal())  # fmt: skip
        status = m.sh("gpud status").stdout
        assert a.name in status and b.name in status, status
        assert "key_mismatch" not in m.sh("gpud doctor", check=False).stdout


def _serve(a: Host2, b: Host2, tmp_path: Path) -> tuple[int, int]:
    """Trust an operator key on both hosts, B's router on, B cordoned, R=1 applied from A."""
    private, public = authority.keygen()
    for m in (a, b):
        m.sh(f"sed -i '/^\\[deployments\\]$/a operators = [\"{public}\"]\\n"
             f"command_allow = [\"/usr/bin/python3\"]' {CONFIG}")  # fmt: skip
    b.sh(f"sed -i '/^\\[router\\]$/a enabled = true' {CONFIG}")
    for m in (a, b):
        m.sh(f"gpud agent --check-config --config {CONFIG} && systemctl restart gpud")
    for m in (a, b):
        _wait(lambda m=m: _both_alive(m, {a.name, b.name}), 60, f"one cluster again on {m.name}")
    b.sh("gpud drain --timeout 30")
    (a.root / SERVER_IN_ROOT.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy(SERVER, a.root / SERVER_IN_ROOT.lstrip("/"))
    command = ["/usr/bin/python3", SERVER_IN_ROOT, "--port", "{port}", "--host", "{host_ip}",
               "--model", "{model}"]  # fmt: skip
    (a.root / "root/solo.toml").write_text(
        f'name = "solo"\nengine = "command"\nmodel = "{MODEL}"\nreplicas = 1\n'
        f'gpus_per_node = 0\nhealth_path = "/health"\ncommand = {json.dumps(command)}\n'
    )
    (a.root / "root/operator.key").write_text(private + "\n")
    a.sh(
        "chmod 0600 /root/operator.key && gpud deploy apply /root/solo.toml --key /root/operator.key"
    )
    served = _wait(
        a.serving,
        90,
        "solo ready on A",
        lambda: a.sh("gpud deploy status solo; gpud doctor", check=False).stdout + a.journal(),
    )
    probe = (
        "import json,urllib.request;"
        f"r=urllib.request.urlopen('http://{b.addr}:{ROUTER_PORT}/v1/models',timeout=5);"
        f"print('{MODEL}' in [m['id'] for m in json.load(r)['data']])"
    )

    def routed() -> bool:
        reply = b.host.run([sys.executable, "-c", probe], check=False)
        return reply.returncode == 0 and reply.stdout.strip() == "True"

    _wait(
        routed,
        60,
        "B's router serving A's replica",
        lambda: b.sh("gpud status", check=False).stdout,
    )
    return served


class MemberWatch(threading.Thread):
    """Samples how B lists A, every half second, until stopped."""

    def __init__(self, b: Host2, name: str) -> None:
        super().__init__(daemon=True)
        self.b, self.name, self.seen = b, name, []  # type: ignore[var-annotated]
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            reply = self.b.sh("gpud members --json", check=False, timeout=30)
            if reply.returncode == 0:
                member = {m["name"]: m for m in json.loads(reply.stdout)["members"]}[self.name]
                self.seen.append((member["status"], member["down"]))


def _restarted(a: Host2, before: int, served: tuple[int, int]) -> bool:
    pid = a.sh("systemctl show gpud -p MainPID --value", check=False).stdout.strip()
    return pid not in ("", "0", str(before)) and a.serving() == served


def test_quick_start_gives_one_cluster_and_a_replica_outlives_restart_and_upgrade(
    hosts: tuple[Host2, Host2], tmp_path: Path
) -> None:
    a, b = hosts
    _quick_start(a, b)
    served = _serve(a, b, tmp_path)
    others = a.unit_processes()
    assert served[0] in others and len(others) == 2, others  # serf and the server

    bases = {
        "direct": f"http://{a.addr}:{served[1]}/v1",
        "routed": f"http://{b.addr}:{ROUTER_PORT}/v1",
    }
    watch = MemberWatch(b, a.name)
    watch.start()
    steps: list[tuple[str, float]] = []
    try:
        with background_load(b.host, bases, tmp_path, MODEL) as files:
            time.sleep(SETTLE_S)
            for step, command in (
                ("systemctl restart", "systemctl restart gpud"),
                ("apt-get install (upgrade)", f"apt-get install -y {a.deb(2)} </dev/null"),
            ):
                before = int(a.show("MainPID"))
                began = time.monotonic()
                a.sh(command, timeout=300)
                _wait(lambda before=before: _restarted(a, before, served), 60,
                      f"adopted after {step}", lambda: a.journal())  # fmt: skip
                steps.append((step, time.monotonic() - began))
                assert a.unit_processes() == others, (step, others, a.unit_processes())
                time.sleep(SETTLE_S)
            assert a.sh("dpkg-query -W -f '${Version}' gpud").stdout.endswith("-2")
    finally:
        watch.stopped.set()
        watch.join(timeout=60)
    print("steps (command -> adopted, s):", [(s, round(t, 1)) for s, t in steps])
    for name, path in files.items():
        loaded = records(path)
        failed = [r for r in loaded if not r["ok"]]
        span = loaded[-1]["sent"] - loaded[0]["sent"]
        print(f"{name}: {len(loaded)} requests in {span:.0f} s, {len(failed)} failed")
        assert not failed, failed[:5]
        assert len(loaded) / span >= 20, (name, len(loaded), span)
    assert watch.seen and set(watch.seen) == {("alive", False)}, sorted(set(watch.seen))
