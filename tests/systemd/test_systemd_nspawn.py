"""The deb on a stock Debian 12 and Debian 13 under a real systemd as PID 1.

For each release, a root of tests/harness/nspawn.py (its own python3: 3.11 on Debian 12, 3.13
on Debian 13; Debian's serf running on serf's defaults) is booted on a private network. The test installs the deb there and checks
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
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import fake_nvml
from tests.harness.nspawn import SUITES, Machine

pytestmark = [pytest.mark.nspawn, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module", params=sorted(SUITES))
def machine(request: pytest.FixtureRequest, debs: tuple[Path, Path]) -> Iterator[Machine]:
    workdir = Path(tempfile.mkdtemp(prefix="gpud-nspawn-"))
    booted: Machine | None = None
    try:
        booted = Machine(workdir, request.param, debs=debs)
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


def test_stock_install_is_active_within_10_s_beside_debians_serf(machine: Machine) -> None:
    # The stand-alone serf of Debian's package runs on its defaults: the conflict gpud avoids.
    # (It restarts until the private network has an address: wait for it.)
    machine.wait("systemctl is-active -q serf && ss -ltn | grep -q ':7946 '", 60, "Debian's serf")
    started = time.monotonic()
    machine.sh(f"dpkg -i {machine.deb(1)}", timeout=120)
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
    # On a host with GPUs that is a problem. NVML cannot be had here: the suite's fake NVML
    # (one GPU) stands in for it, through a drop-in, under the same packaged unit.
    fake_dir = machine.root / "usr/local/lib/gpud-test"
    fake_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(fake_nvml.__file__, fake_dir / "fake_nvml.py")
    state = machine.root / "var/lib/gpud-test/nvml.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    fake_nvml.write_state(state, fake_nvml.node(1))
    state.chmod(0o644)
    dropin = "/etc/systemd/system/gpud.service.d/fake-nvml.conf"
    config = "/etc/gpud/gpud.toml"
    machine.sh(f"cp {config} /root/before-fake-nvml.toml && mkdir -p {dropin.rsplit('/', 1)[0]} && "
               f"printf '[Service]\\nEnvironment=PYTHONPATH=/usr/local/lib/gpud-test "
               f"{fake_nvml.ENV}=/var/lib/gpud-test/nvml.json\\n' > {dropin} && "
               f"sed -i '/^\\[gpus\\]$/a nvml_module = \"fake_nvml\"' {config} && "
               "systemctl daemon-reload && systemctl restart gpud")  # fmt: skip
    try:
        machine.wait(
            "gpud doctor | grep -q 'gpus.xid_source_unavailable'",
            30,
            "the missing kernel log as a problem on a host with a GPU",
        )
        doctor = machine.sh("gpud doctor", check=False).stdout
        assert "kernel XIDs are not seen: cannot read /dev/kmsg" in doctor, doctor
    finally:
        machine.sh(f"rm {dropin} && cp /root/before-fake-nvml.toml {config} && "
                   "systemctl daemon-reload && systemctl restart gpud")  # fmt: skip
        machine.wait("systemctl is-active -q gpud", 15, "active again without the fake NVML")


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
    machine.sh(f"dpkg -i {machine.deb(2)}", timeout=120)
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
    machine.sh(f"dpkg -i --force-confold {machine.deb(1)} </dev/null", timeout=120)
    assert machine.sh("cat /etc/gpud/cluster.key").stdout == key
    assert machine.sh("stat -c '%U:%G %a' /etc/gpud/cluster.key").stdout.strip() == "gpud:gpud 600"
    assert machine.sh("cat /etc/gpud/gpud.toml").stdout == config
    machine.wait("systemctl is-active -q gpud", 15, "active with the pre-seeded files")
    machine.wait("gpud status | grep -q preseeded", 15, "the pre-seeded node name")
    machine.sh("dpkg -P gpud", timeout=120)
