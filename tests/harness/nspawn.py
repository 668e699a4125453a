"""Debian roots booted under a real systemd as PID 1 (systemd-nspawn), with gpud's packages.

A root is a minimal debootstrap of a Debian release (cached under .cache/nspawn between runs)
with its own python3 and Debian's `serf` package, whose serf.service starts on boot on serf's
defaults (7946, 127.0.0.1:7373): the stand-alone serf gpud must live beside. Each `Machine`
boots a copy with `systemd-nspawn --register=no --keep-unit -b`, either on a private network of
its own or inside a harness host's network namespace (`tests/harness/netns.py`), so that two
machines can form one cluster; commands run in it with `nsenter -t <its PID 1> -a`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
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
# Where the packages are put inside a root (not /tmp: the container mounts a fresh tmpfs there).
DEBS_DIR = "var/cache/gpud-test"


def unusable() -> str | None:
    """Why this machine cannot boot the roots, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, nsenter)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb", "rpmbuild"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: run scripts/setup.sh (systemd-container, debootstrap)"
    return None


def run(
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


def base_root(suite: str) -> Path:
    """The cached debootstrap'd root of ``suite`` (made once; a partial one is never used)."""
    base = CACHE / f"{suite}-{PACKAGES.replace(',', '_')}"
    if (base / ".complete").exists():
        return base
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, partial, MIRROR,
        timeout=1500)  # fmt: skip
    # The booted system must not wait for a network it does not have.
    (partial / "etc/hostname").write_text("gpudtest\n")
    partial.rename(base)
    (base / ".complete").touch()
    return base


def build_debs(base: Path) -> tuple[Path, Path]:
    """The deb built twice from one staged tree: revisions 1 and 2 (an upgrade)."""
    build = [sys.executable, ROOT / "packaging" / "build.py", "--out", base / "out",
             "--work", base / "work"]  # fmt: skip
    run(*build)
    run(*build, "--reuse-stage", "--revision", "2")
    return next((base / "out").glob("gpud_*-1_*.deb")), next((base / "out").glob("gpud_*-2_*.deb"))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


class Machine:
    """A booted copy of the base root: systemd as PID 1 in its own namespaces. ``netns``: the
    name of a network namespace (under /run/netns) to run in; None: a private network."""

    def __init__(
        self,
        workdir: Path,
        suite: str,
        *,
        netns: str | None = None,
        hostname: str = "gpudtest",
        debs: tuple[Path, ...] = (),
    ) -> None:
        self.suite = suite
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root"
        run("cp", "-a", "--reflink=auto", base_root(suite), self.root)
        (self.root / "etc/hostname").write_text(hostname + "\n")
        (self.root / DEBS_DIR).mkdir(parents=True)
        for deb in debs:
            shutil.copy(deb, self.root / DEBS_DIR / deb.name)
        network = (
            ["--private-network"]
            if netns is None
            else [f"--network-namespace-path=/run/netns/{netns}"]
        )
        self.log_path = workdir / "nspawn.log"
        self._log = open(self.log_path, "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", *network, "-q",
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
        return run("nsenter", "-t", self.pid1, "-a", "/bin/sh", "-c", script,
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

    def deb(self, revision: int) -> str:
        """The path inside the root of the deb of ``revision``."""
        found = (self.root / DEBS_DIR).glob(f"gpud_*-{revision}_*.deb")
        return f"/{DEBS_DIR}/{next(found).name}"

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
