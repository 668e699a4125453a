"""The deb on a stock Debian 12 and Debian 13 under a real systemd as PID 1.

For each release, a minimal root (debootstrap, cached under .cache/nspawn between runs) with
its own python3 (3.11 on Debian 12, 3.13 on Debian 13) and Debian's `serf` package installed, whose serf.service starts on boot on serf's defaults (7946,
127.0.0.1:7373), is booted with `systemd-nspawn --register=no --keep-unit --private-network -b`;
commands run in it with `nsenter -t <its PID 1> -a`. The test installs the deb there and checks
what an operator sees: active within 10 s with Debian's serf running beside it, READY and
STATUS=, `gpud status` for a group member (refused for others), `gpud gpus` naming why the
kernel log is not followed (a container has no /dev/kmsg), kill -9 and the watchdog
restart it, reload, error priorities in the journal, an upgrade keeping an edited config,
remove (the reserved port block given back) and purge (the user kept), then a pre-seeded
install (key and config in place before `dpkg -i`: both kept, gpud starts with them).

If gpud's ports collide with the stand-alone serf again, gpud does not become active and the
test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "nspawn"
# What the booted root holds besides minbase: systemd as init, the release's own python3 (the
# venv is built with it at install), Debian's serf (the stand-alone daemon gpud must live
# beside), tools for checks.
PACKAGES = "systemd,systemd-sysv,dbus,python3,serf,procps,iproute2"
MIRROR = "http://deb.debian.org/debian"
# Debian release -> its python3's version (what make-venv must pick there).
SUITES = {"bookworm": "3.11", "trixie": "3.13"}
DEBS_DIR = "var/cache/gpud-test"
pytestmark = [pytest.mark.nspawn, pytest.mark.timeout(1800)]


def _unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, nsenter)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb", "rpmbuild"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: run scripts/setup.sh (systemd-container, debootstrap)"
    return None


def _run(
    *cmd: str | Path, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def _base_root(suite: str) -> Path:
    """The cached debootstrap'd root of ``suite`` (made once; a partial one is never used)."""
    base = CACHE / f"{suite}-{PACKAGES.replace(',', '_')}"
    if (base / ".complete").exists():
        return base
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    _run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, partial, MIRROR,
         timeout=1500)  # fmt: skip
    # The booted system must not wait for a network it does not have.
    (partial / "etc/hostname").write_text("gpudtest\n")
    partial.rename(base)
    (base / ".complete").touch()
    return base


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


class Machine:
    """A booted copy of the base root: systemd as PID 1 in its own namespaces."""

    def __init__(self, workdir: Path, suite: str) -> None:
        self.suite = suite
        self.root = workdir / "root"
        _run("cp", "-a", "--reflink=auto", _base_root(suite), self.root)
        self.log_path = workdir / "nspawn.log"
        self._log = open(self.log_path, "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network", "-q",
             "-b", "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid1 = self._wait_init()
        self._wait_booted()

    def _wait_init(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                pytest.fail(f"systemd-nspawn exited: {self.log_path.read_text(errors='replace')}")
            for child in _children(self.nspawn.pid):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
            time.sleep(0.2)
        pytest.fail(f"no systemd in the container: {self.log_path.read_text(errors='replace')}")

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        pytest.fail(
            f"container did not boot ({state}): {self.sh('systemctl --failed', check=False).stdout}"
        )

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with /bin/sh inside the container (all its namespaces)."""
        return _run("nsenter", "-t", self.pid1, "-a", "/bin/sh", "-c", script,
                    timeout=timeout, check=check)  # fmt: skip

    def wait(self, script: str, timeout: float, what: str) -> float:
        """Seconds until ``script`` succeeds inside the container."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.sh(script, check=False).returncode == 0:
                return time.monotonic() - started
            time.sleep(0.25)
        pytest.fail(f"{what}: not within {timeout} s\n{self.journal()}")

    def journal(self, unit: str = "gpud") -> str:
        return self.sh(f"journalctl -u {unit} --no-pager -n 60", check=False).stdout

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show gpud -p {prop} --value").stdout.strip()

    def stop(self) -> None:
        """Power the container off; kill it (its nspawn, then its PID 1) if that hangs."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=30)
        if Path(f"/proc/{self.pid1}").exists():
            os.kill(self.pid1, signal.SIGKILL)  # the namespace's init: takes the rest with it
        self._log.close()


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if reason := _unusable():
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("nspawn-debs")
    build = [
        sys.executable,
        ROOT / "packaging" / "build.py",
        "--out",
        base / "out",
        "--work",
        base / "work",
    ]
    _run(*build)
    _run(*build, "--reuse-stage", "--revision", "2")
    return next((base / "out").glob("gpud_*-1_*.deb")), next((base / "out").glob("gpud_*-2_*.deb"))


@pytest.fixture(scope="module", params=sorted(SUITES))
def machine(request: pytest.FixtureRequest, debs: tuple[Path, Path]) -> Iterator[Machine]:
    workdir = Path(tempfile.mkdtemp(prefix="gpud-nspawn-"))
    booted: Machine | None = None
    try:
        booted = Machine(workdir, request.param)
        # Not /tmp: the container mounts a fresh tmpfs over it.
        (booted.root / DEBS_DIR).mkdir(parents=True)
        for deb in debs:
            shutil.copy(deb, booted.root / DEBS_DIR / deb.name)
        # A host has a real interface and a default route (advertise = "auto" needs one); the
        # private network has only lo, so give it a veth pair inside its own namespace.
        booted.sh(
            "ip link add eth0 type veth peer name eth1 && ip addr add 10.99.0.2/24 dev eth0 && "
            "ip link set eth0 up && ip link set eth1 up && ip link set lo up && "
            "ip route add default via 10.99.0.1 dev eth0"
        )
        yield booted
    finally:
        if booted is not None:
            booted.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _deb(machine: Machine, revision: int) -> str:
    return next(
        f"/{DEBS_DIR}/{p.name}" for p in (machine.root / DEBS_DIR).glob(f"gpud_*-{revision}_*.deb")
    )


def test_stock_install_is_active_within_10_s_beside_debians_serf(machine: Machine) -> None:
    # The stand-alone serf of Debian's package runs on its defaults: the conflict gpud avoids.
    # (It restarts until the private network has an address: wait for it.)
    machine.wait("systemctl is-active -q serf && ss -ltn | grep -q ':7946 '", 60, "Debian's serf")
    started = time.monotonic()
    machine.sh(f"dpkg -i {_deb(machine, 1)}", timeout=120)
    installed_s = time.monotonic() - started
    assert installed_s < 60, f"dpkg -i took {installed_s:.0f} s (blocked on a start?)"
    active_s = machine.wait("systemctl is-active -q gpud", 10, "gpud active after install")
    print(f"dpkg -i {installed_s:.1f} s, active {active_s:.1f} s later")
    status = machine.show("StatusText")
    assert status and not status.startswith("failed"), status
    assert machine.sh("systemctl is-active serf").stdout.strip() == "active"  # left alone
    # The venv was built at install with this release's own python3.
    version = machine.sh(
        "/opt/gpud/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
    )
    assert version.stdout.strip() == SUITES[machine.suite]
    # api.admin_group's default exists, so its members can lease and deploy.
    machine.sh("getent group gpud-admin")


def test_status_for_group_members_only(machine: Machine) -> None:
    machine.sh(
        "id op >/dev/null 2>&1 || useradd -m -G gpud op; id other >/dev/null 2>&1 || useradd -m other"
    )
    member = machine.sh("runuser -u op -- gpud status", check=False)
    assert member.returncode == 0, member.stdout + member.stderr
    assert "gpudtest" in member.stdout or "members" in member.stdout, member.stdout
    outsider = machine.sh("runuser -u other -- gpud status", check=False)
    assert outsider.returncode != 0 and "Traceback" not in outsider.stderr
    assert outsider.stderr.strip().count("\n") == 0, outsider.stderr  # one clear line


def test_gpud_gpus_names_why_the_kernel_log_is_not_followed(machine: Machine) -> None:
    """systemd-nspawn gives a container no /dev/kmsg (the kernel log is the host's, and a
    test must not write a fake XID into the host's log, where a real GPU monitor could act on
    it): under the packaged unit `gpud gpus` then says that XIDs from the kernel log are not
    seen and why, instead of showing nothing."""
    assert machine.sh("test -e /dev/kmsg", check=False).returncode != 0
    machine.wait(
        "gpud gpus | grep -qF 'kernel log not used: cannot read /dev/kmsg (No such file'",
        30,
        "gpud gpus naming the missing kernel log",
    )
    view = json.loads(machine.sh("gpud gpus --json").stdout)
    assert view["kmsg"].startswith("not used: cannot read /dev/kmsg"), view


def test_kill_9_and_watchdog_restart_it(machine: Machine) -> None:
    first = int(machine.show("MainPID"))
    machine.sh(f"kill -9 {first}")
    machine.wait(
        f"[ \"$(systemctl show gpud -p MainPID --value)\" != {first} ] && "
        "[ \"$(systemctl show gpud -p MainPID --value)\" != 0 ] && systemctl is-active -q gpud",
        30, "restart after kill -9",
    )  # fmt: skip
    # A frozen gpud stops feeding the watchdog (WatchdogSec=30s): systemd aborts and restarts it.
    second = int(machine.show("MainPID"))
    machine.sh(f"kill -STOP {second}")
    took = machine.wait(
        f"[ \"$(systemctl show gpud -p MainPID --value)\" != {second} ] && systemctl is-active -q gpud",
        60, "watchdog restart of a frozen gpud",
    )  # fmt: skip
    print(f"watchdog restart {took:.0f} s after SIGSTOP")


def test_reload_and_journal_priorities(machine: Machine) -> None:
    pid = machine.show("MainPID")
    config = "/etc/gpud/gpud.toml"
    machine.sh(
        f"sed -i 's/^# priority = 0/priority = 4/' {config} && grep -q '^priority = 4' {config}"
    )
    machine.sh("systemctl reload gpud")
    machine.wait(
        "journalctl -u gpud -o cat | grep -q 'msg=reloaded applied=ray.priority'", 10, "reload"
    )
    # A broken file: refused at error priority, gpud keeps running with the old one.
    machine.sh(
        f"cp {config} /root/good.toml && echo '[ports]' >> {config} && echo 'block_size = 1' >> {config}"
    )
    machine.sh("systemctl reload gpud")
    machine.wait(
        "journalctl -u gpud -p err -o cat | grep -q 'reload refused'", 10, "refused reload"
    )
    machine.sh(f"cp /root/good.toml {config}")
    assert machine.show("MainPID") == pid and machine.show("ActiveState") == "active"
    records = [
        json.loads(line)
        for line in machine.sh("journalctl -u gpud -o json --no-pager").stdout.splitlines()
    ]
    assert any(r["PRIORITY"] == "3" and "reload refused" in str(r.get("MESSAGE")) for r in records)
    assert any(r["PRIORITY"] == "6" and "msg=ready" in str(r.get("MESSAGE")) for r in records)
    # No line carries a literal "<N>" (journald took the prefix as the priority).
    assert not any(str(r.get("MESSAGE", "")).startswith("<") for r in records)
    messages = [str(r.get("MESSAGE", "")) for r in records]
    # serf's own lines arrive parsed: no Go timestamps or "[INFO]" inside, no blank msg="".
    serf_lines = [m for m in messages if "component=serf " in m]
    assert serf_lines and not any("[INFO]" in m or 'msg=""' in m for m in serf_lines)
    assert not any("never retrieved" in m or "Traceback" in m for m in messages)


def test_a_port_conflict_fails_the_start_and_names_the_holder(machine: Machine) -> None:
    """Pointed at Debian's serf's port, gpud must fail at once (not hang in `activating`) and
    say which port and whose process, in STATUS= and at error priority in the journal."""
    config = "/etc/gpud/gpud.toml"
    machine.sh(f"cp {config} /root/before-conflict.toml")
    machine.sh(f"sed -i 's/^# bind_port = 7951 /bind_port = 7946 /' {config} && "
               f"grep -q '^bind_port = 7946' {config}")  # fmt: skip
    started = time.monotonic()
    machine.sh("systemctl restart gpud", check=False, timeout=120)
    took = time.monotonic() - started
    assert took < 30, f"systemctl restart took {took:.0f} s"
    assert machine.show("ActiveState") != "active"
    result = machine.show("Result")
    assert result == "exit-code", result
    status = machine.show("StatusText")
    assert "port conflict" in status and ":7946/tcp (serf.bind_port)" in status, status
    errors = machine.sh("journalctl -u gpud -p err -o cat --no-pager").stdout
    assert "7946/tcp (serf.bind_port) is in use by" in errors and "root" in errors, errors
    machine.sh(f"cp /root/before-conflict.toml {config} && systemctl restart gpud", timeout=120)
    machine.wait("systemctl is-active -q gpud", 15, "active again without the conflict")


def test_upgrade_keeps_the_edited_config(machine: Machine) -> None:
    config = "/etc/gpud/gpud.toml"
    machine.sh(f"echo '# operator edit' >> {config}")
    edited = machine.sh(f"cat {config}").stdout
    machine.sh(f"dpkg -i {_deb(machine, 2)}", timeout=120)
    assert machine.sh(f"cat {config}").stdout == edited
    machine.wait("systemctl is-active -q gpud", 15, "active after upgrade")


def test_remove_frees_the_block_and_purge_keeps_the_user(machine: Machine) -> None:
    reserved = machine.sh("cat /proc/sys/net/ipv4/ip_local_reserved_ports").stdout.strip()
    machine.sh("dpkg -r gpud", timeout=120)
    assert machine.sh("systemctl is-active gpud", check=False).stdout.strip() != "active"
    # A stop leaves serf running for the next gpud; a removal leaves nothing of gpud's.
    left = machine.sh("systemd-cgls --no-pager -u gpud.service", check=False).stdout
    assert "/usr/libexec/gpud/serf" not in left, left
    after = machine.sh("cat /proc/sys/net/ipv4/ip_local_reserved_ports").stdout.strip()
    in_space = [r for r in after.split(",") if r and 20000 <= int(r.split("-")[0]) < 32000]
    assert in_space == [], (reserved, after)
    assert machine.sh("test -e /opt/gpud", check=False).returncode != 0
    machine.sh("dpkg -P gpud", timeout=120)
    assert machine.sh("test -e /etc/gpud", check=False).returncode != 0
    machine.sh("getent passwd gpud && getent group gpud")  # Debian keeps system users
    assert machine.sh("systemctl is-active serf").stdout.strip() == "active"


def test_preseeded_key_and_config_are_kept(machine: Machine) -> None:
    """Config management puts the key and the config in place before the package: the first
    install keeps both (no new key; --force-confold keeps the config without a prompt), hands
    the key to the service user, and gpud starts with them."""
    key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    machine.sh("mkdir -p /etc/gpud && "
               f"(umask 077 && printf '%s' '{key}' > /etc/gpud/cluster.key) && "
               "printf '[cluster]\\nkey_file = \"/etc/gpud/cluster.key\"\\n"
               "[node]\\nname = \"preseeded\"\\n' > /etc/gpud/gpud.toml && "
               "chmod 0644 /etc/gpud/gpud.toml")  # fmt: skip
    config = machine.sh("cat /etc/gpud/gpud.toml").stdout
    machine.sh(f"dpkg -i --force-confold {_deb(machine, 1)} </dev/null", timeout=120)
    assert machine.sh("cat /etc/gpud/cluster.key").stdout == key
    assert machine.sh("stat -c '%U:%G %a' /etc/gpud/cluster.key").stdout.strip() == "gpud:gpud 600"
    assert machine.sh("cat /etc/gpud/gpud.toml").stdout == config
    machine.wait("systemctl is-active -q gpud", 15, "active with the pre-seeded files")
    machine.wait("gpud status | grep -q preseeded", 15, "the pre-seeded node name")
    machine.sh("dpkg -P gpud", timeout=120)
