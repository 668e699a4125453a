"""The deb and rpm: build both from one staged tree, inspect them, install the deb for real
(dpkg -i into /, purged at the end), install the rpm into a scratch root and build its venv
from the bundled wheels (make-venv refuses a tampered wheel and an unsupported Python), check
the copyright file against the DEP-5 rules and the serf pin, and check the systemd unit and
the privilege it keeps against the running kernel.
"""

from __future__ import annotations

import grp
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given

from gpud import config as gpud_config
from gpud.secret import parse_key
from tests.harness.netns import kill_process_tree
from tests.harness.serf import free_ports

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "gpud.service"
DEFAULT_CONFIG = ROOT / "packaging" / "gpud.toml"
WANTS_LINK = Path("/etc/systemd/system/multi-user.target.wants/gpud.service")
BUILD_TOOLS = ("dpkg-deb", "rpmbuild", "rpm", "/usr/bin/python3.11", "/usr/bin/serf")
VENV = Path("/opt/gpud")


def _load_build() -> ModuleType:
    """packaging/build.py as a module (the name `packaging` is the PyPI library's)."""
    spec = importlib.util.spec_from_file_location("gpud_build", ROOT / "packaging" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves annotations through it
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def _run(
    *cmd: str | Path, check: bool = True, timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


BUILD_TIMEOUT_S = 900
# Whichever test first needs the packages pays for both builds.
BUILD_MARK_S = 2 * BUILD_TIMEOUT_S + 300


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path
    deb_upgrade: Path  # same staged tree, revision 2


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    _need(*BUILD_TOOLS)
    base = tmp_path_factory.mktemp("packages")
    build = [sys.executable, ROOT / "packaging" / "build.py", "--out", base / "out"]
    # Staging builds wheels for three CPythons: minutes on a loaded 2-core machine.
    _run(*build, "--work", base / "work", timeout=BUILD_TIMEOUT_S)
    _run(
        *build, "--work", base / "work", "--reuse-stage", "--revision", "2", timeout=BUILD_TIMEOUT_S
    )
    out = base / "out"
    arch = os.uname().machine
    deb_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    version = _project_version()
    return Packages(
        deb=out / f"gpud_{version}-1_{deb_arch}.deb",
        rpm=out / f"gpud-{version}-1.{arch}.rpm",
        deb_upgrade=out / f"gpud_{version}-2_{deb_arch}.deb",
    )


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- the unit and the default config ------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _need("systemd-analyze")
    settings = _unit_settings(UNIT.read_text())
    assert settings["ExecStart"] == ["/usr/bin/gpud agent --config /etc/gpud/gpud.toml"]
    # /usr/bin/gpud exists only once the package is installed: verify against a stand-in
    # executable so that every other complaint still fails the test.
    stand_in = tmp_path / "gpud"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "gpud.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/gpud ", f"{stand_in} "))
    result = _run("systemd-analyze", "verify", unit, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_keeps_only_the_privileges_gpud_needs() -> None:
    settings = _unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "KillMode": "process",
        "User": "gpud",
        "Group": "gpud",
        "RuntimeDirectory": "gpud",
        "RuntimeDirectoryMode": "0750",
        "StateDirectory": "gpud",
        "AmbientCapabilities": "CAP_NET_ADMIN CAP_SYSLOG",
        "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_SYSLOG",
        "NoNewPrivileges": "yes",
        # A config error exits 2 (test_bad_config_exits_2): no restart loop on it.
        "RestartPreventExitStatus": "2",
        "PrivateTmp": "yes",
    }
    assert {key: settings.get(key, [None])[-1] for key in expected} == expected
    assert "TimeoutStopSec" in settings
    # Each of these would break gpud or its Ray children (see the comments in the unit).
    for breaking in ("PrivateDevices", "ProtectKernelTunables", "MemoryDenyWriteExecute",
                     "ProtectClock", "DeviceAllow", "PrivateNetwork", "DynamicUser",
                     # hides /dev/kmsg, the XID source
                     "ProtectKernelLogs"):  # fmt: skip
        assert breaking not in settings, breaking
    families = settings["RestrictAddressFamilies"][-1].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a netns and drop to nobody")
def test_reserved_ports_sysctl_needs_exactly_cap_net_admin() -> None:
    """The unit's claim, checked on this kernel in a throwaway netns: an unprivileged uid may
    write net.ipv4.ip_local_reserved_ports with CAP_NET_ADMIN and only with it."""
    _need("unshare", "setpriv")
    sysctl = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    script = (
        f"setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "
        f"sh -c 'echo 20000-20009 > {sysctl}' 2>/dev/null && echo without=ok || echo without=denied; "
        f"setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=+net_admin "
        f"--ambient-caps=+net_admin sh -c 'echo 20000-20009 > {sysctl}' && echo with=ok; "
        f"cat {sysctl}"
    )
    result = _run("unshare", "--net", "sh", "-c", script)
    assert result.stdout.split() == ["without=denied", "with=ok", "20000-20009"], result


def test_bad_config_exits_2(tmp_path: Path) -> None:
    """The status the unit's RestartPreventExitStatus= names: a config error, not a crash."""
    bad = tmp_path / "gpud.toml"
    bad.write_text("[ports]\nblock_size = 3\n")
    for config in (bad, tmp_path / "missing.toml"):
        result = _run(sys.executable, "-m", "gpud", "agent", "--config", config, check=False)
        assert result.returncode == 2 and str(config) in result.stderr, result


def test_ray_logs_default_under_the_state_dir() -> None:
    """PrivateTmp= deletes the unit's /tmp at every stop: Ray's logs must not live there."""
    config = gpud_config.Config()
    assert Path(config.ray.temp_root).is_relative_to(config.paths.state_dir)
    assert "PrivateTmp=yes" in UNIT.read_text()


def test_promtool_accepts_the_shipped_rules() -> None:
    _need("promtool")
    rules = ROOT / "packaging" / "monitoring" / "gpud-rules.yml"
    result = _run("promtool", "check", "rules", rules, check=False)
    assert result.returncode == 0 and "SUCCESS: 9 rules found" in result.stdout, result


def test_default_config_lists_every_key_with_its_default() -> None:
    text = DEFAULT_CONFIG.read_text()
    # As shipped: only the generated cluster key is set.
    assert gpud_config.parse(text) == gpud_config.Config(
        cluster=gpud_config.ClusterConfig(key_file="/etc/gpud/cluster.key")
    )
    # Uncommenting every "# key = value" line changes nothing: the comments are the defaults.
    uncommented = "\n".join(
        re.sub(r"^# ([a-z_]+ = .*?)(\s+#.*)?$", r"\1", line) for line in text.splitlines()
    )
    assert gpud_config.parse(uncommented) == gpud_config.parse(text)
    # Every key of gpud.config appears, in its section (num_cpus has no default to show).
    for top in msgspec.structs.fields(gpud_config.Config):
        if not (isinstance(top.type, type) and issubclass(top.type, msgspec.Struct)):
            assert re.search(rf"^# {top.name} = ", text, re.M), top.name
            continue
        body = text.split(f"[{top.name}]\n", 1)[1].split("\n[", 1)[0]
        for field in msgspec.structs.fields(top.type):
            assert re.search(rf"^#? ?\(?{field.name}[ :]", body, re.M), f"{top.name}.{field.name}"


# --- package contents ----------------------------------------------------------------------


def _deb_contents(deb: Path) -> dict[str, str]:
    """path -> mode string (e.g. "-rwxr-xr-x root/root")."""
    listing = _run("dpkg-deb", "--contents", deb).stdout.splitlines()
    entries = {}
    for line in listing:
        fields = line.split()
        path = fields[5].removeprefix(".")
        entries[path.rstrip("/") or "/"] = f"{fields[0]} {fields[1]}"
    return entries


def _extract_deb(deb: Path, dest: Path) -> Path:
    _run("dpkg-deb", "-x", deb, dest)
    return dest


@pytest.mark.timeout(BUILD_MARK_S)
def test_deb_metadata_files_and_modes(packages: Packages, tmp_path: Path) -> None:
    field = _run("dpkg-deb", "--field", packages.deb, "Package", "Version", "Depends").stdout
    assert "Package: gpud" in field and f"Version: {_project_version()}-1" in field
    depends = [d.strip() for d in field.split("Depends:")[1].strip().split(",")]
    # Any one supported CPython: the venv is built with it at install (Debian 12: 3.11,
    # Ubuntu 24.04: 3.12, Debian 13: 3.13). serf is bundled: Debian's serf package would
    # start its own serf.service on 7946/7373.
    assert depends[0] == "python3.13 | python3.12 | python3.11"
    assert not any(d.startswith("serf") for d in depends)
    maintainer = _run("dpkg-deb", "--field", packages.deb, "Maintainer").stdout.strip()
    assert maintainer == build.MAINTAINER and re.fullmatch(
        r"[^<>]+ <[^@<>\s]+@[^@<>\s]+>", maintainer
    )
    assert "localhost" not in maintainer
    assert not any(d.startswith("ray") or "vllm" in d for d in depends)

    with tempfile.TemporaryDirectory() as control:
        _run("dpkg-deb", "--control", packages.deb, control)
        assert Path(control, "conffiles").read_text().split() == ["/etc/gpud/gpud.toml"]
        for script in ("postinst", "prerm", "postrm"):
            assert Path(control, script).stat().st_mode & 0o777 == 0o755
            _run("sh", "-n", Path(control, script))
        postinst = Path(control, "postinst").read_text()
        assert "deb-systemd-helper enable 'gpud.service'" in postinst
        assert "if [ -d /run/systemd/system ]" in postinst
        assert "/usr/libexec/gpud/make-venv" in postinst
        postrm = Path(control, "postrm").read_text()
        assert "deb-systemd-helper purge" in postrm and "rm -rf /opt/gpud" in postrm
        assert "userdel" not in postrm and "groupdel" not in postrm  # the system user stays
        assert "reserve.unreserve" in Path(control, "prerm").read_text()

    entries = _deb_contents(packages.deb)
    expected = {
        "/etc/gpud/gpud.toml": "-rw-r--r-- root/root",
        "/usr/lib/systemd/system/gpud.service": "-rw-r--r-- root/root",
        "/usr/lib/sysusers.d/gpud.conf": "-rw-r--r-- root/root",
        "/usr/lib/tmpfiles.d/gpud.conf": "-rw-r--r-- root/root",
        "/usr/bin/gpud": "lrwxrwxrwx root/root",
        "/usr/libexec/gpud/make-venv": "-rwxr-xr-x root/root",
        "/usr/lib/gpud/wheels/requirements.txt": "-rw-r--r-- root/root",
    }
    assert {path: entries.get(path) for path in expected} == expected
    # The venv is not in the package: postinst builds it for the host's interpreter.
    assert not any(p.startswith("/opt/") for p in entries)
    # serf off PATH, so it never meets a stand-alone serf; its license in the copyright file.
    assert entries["/usr/libexec/gpud/serf"] == "-rwxr-xr-x root/root"
    assert "/usr/bin/serf" not in entries
    for doc in ("copyright", "changelog.gz", "README.md"):
        assert f"/usr/share/doc/gpud/{doc}" in entries, doc
    assert "/usr/share/man/man1/gpud.1.gz" in entries
    for paths in build.COMPLETION_FILES.values():  # bash, zsh (Debian's and Fedora's), fish
        for path in paths:
            assert entries[f"/{path}"] == "-rw-r--r-- root/root", path
    # The monitoring mixin (the rpm test checks the rpm holds every file of the deb).
    for name in ("gpud-rules.yml", "gpud-dashboard.json"):
        assert entries[f"/usr/share/gpud/monitoring/{name}"] == "-rw-r--r-- root/root", name
    # A wheel of every compiled dependency for every supported CPython; no Ray, vLLM, tests.
    wheels = [p.rsplit("/", 1)[1] for p in entries if p.endswith(".whl")]
    for version in build.SUPPORTED_PYTHONS:
        tag = "cp" + version.replace(".", "")
        for dist in ("msgspec", "msgpack", "aiohttp", "yarl"):
            assert any(w.startswith(f"{dist}-") and f"-{tag}-" in w for w in wheels), (dist, tag)
    assert not any(w.startswith(("ray-", "vllm-", "torch-")) for w in wheels)
    assert not any(p.endswith((".h", ".c", ".pyc")) or "__pycache__" in p for p in entries)
    # The operator reference, not the build notes.
    root = _extract_deb(packages.deb, tmp_path / "deb")
    assert (root / "usr/share/doc/gpud/README.md").read_text() == (ROOT / "README.md").read_text()


def _license_names(expression: str) -> set[str]:
    return set(re.findall(r"[^\s,]+", expression)) - {"and", "or", "with"}


@pytest.mark.timeout(BUILD_MARK_S)
def test_copyright_file_is_valid_dep5(packages: Packages, tmp_path: Path) -> None:
    """The format's rules: a header paragraph, Files paragraphs with Files, Copyright and
    License, and every license short name given its text (inline or stand-alone); parsed
    strictly by python-debian where it is installed."""
    text = (
        _extract_deb(packages.deb, tmp_path / "deb") / "usr/share/doc/gpud/copyright"
    ).read_text()
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.strip())]
    fields = [build._deb822_paragraphs(p)[0] for p in paragraphs]
    header, body = fields[0], fields[1:]
    assert header["Format"] == "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    assert header["Upstream-Contact"] == build.MAINTAINER
    files = [f for f in body if "Files" in f]
    licenses = [f for f in body if "Files" not in f]
    standalone = {f["License"].split("\n")[0].strip(): f for f in licenses}
    assert len(standalone) == len(licenses)  # one stand-alone paragraph per short name
    with_text = set()
    for paragraph in files:
        assert {"Files", "Copyright", "License"} <= set(paragraph), paragraph
        synopsis, _, inline = paragraph["License"].partition("\n")
        assert "(" not in synopsis and " OR " not in synopsis and " AND " not in synopsis, synopsis
        if not inline.strip():
            with_text |= _license_names(synopsis)
    for p in body:
        if "Files" not in p:
            name, _, license_text = p["License"].partition("\n")
            assert len(license_text.strip()) > 200, name  # a real text, not a pointer
    assert with_text <= set(standalone), with_text - set(standalone)
    covered = {f["Files"] for f in files}
    assert "*" in covered and "usr/libexec/gpud/serf" in covered
    serf = next(f for f in files if f["Files"] == "usr/libexec/gpud/serf")
    assert "HashiCorp" in serf["Copyright"] and "0.8.2-dev" in serf["Comment"]
    assert build.SERF_DEB_VERSION in serf["Comment"]
    for dist in ("aiohttp", "msgspec", "pyroute2", "pip"):
        assert any(f["Files"].startswith(f"usr/lib/gpud/wheels/{dist}-") for f in files), dist
    try:
        from debian import copyright as deb_copyright
    except ImportError:
        return
    parsed = deb_copyright.Copyright(text.splitlines(keepends=True), strict=True)
    assert parsed.find_files_paragraph("usr/libexec/gpud/serf").license.synopsis == serf["License"]
    assert parsed.find_files_paragraph("usr/bin/gpud").license.synopsis == "Apache-2.0"


_SPDX_ID = st.sampled_from(["MIT", "Apache-2.0", "BSD-3-Clause", "GPL-2.0-or-later", "PSF-2.0"])


@given(
    st.lists(_SPDX_ID, min_size=1, max_size=3),
    st.sampled_from([" AND ", " OR "]),
    st.sampled_from([" AND ", " OR "]),
    st.booleans(),
)
def test_dep5_expression_keeps_the_licenses_and_drops_spdx_syntax(
    ids: list[str], inner: str, outer: str, grouped: bool
) -> None:
    expression = inner.join(ids)
    if grouped:
        expression = f"({expression}){outer}MIT"
    converted = build.dep5_expression(expression)
    assert "(" not in converted and ")" not in converted
    assert " AND " not in converted and " OR " not in converted
    assert _license_names(converted) == set(ids) | ({"MIT"} if grouped else set())
    if grouped and len(ids) > 1:
        # DEP-5 has no parentheses: the outer operator gets the comma (lowest precedence).
        assert f", {outer.strip().lower()} MIT" in converted


def test_the_bundled_serf_is_pinned_by_checksum(tmp_path: Path) -> None:
    _need("/usr/bin/serf")
    arch = os.uname().machine
    if arch not in build.SERF_SHA256:
        pytest.skip(f"no serf pin for {arch}")
    assert build.serf_mismatch(Path("/usr/bin/serf"), arch) is None
    tampered = tmp_path / "serf"
    tampered.write_bytes(Path("/usr/bin/serf").read_bytes() + b"\0")
    problem = build.serf_mismatch(tampered, arch)
    assert problem and build.SERF_SHA256[arch] in problem and build.SERF_DEB_VERSION in problem
    assert "no pinned serf for riscv64" in (build.serf_mismatch(tampered, "riscv64") or "")
    # The version the packages state is the source's; serf itself says 0.8.2-dev.
    assert "0.8.2-dev" in _run("/usr/bin/serf", "version").stdout
    dpkg = _run("dpkg-query", "-W", "-f", "${Version}", "serf", check=False)
    if dpkg.returncode == 0:
        assert dpkg.stdout == build.SERF_DEB_VERSION


@pytest.mark.timeout(BUILD_MARK_S)
def test_payload_is_exactly_the_lock(packages: Packages, tmp_path: Path) -> None:
    """Every bundled wheel is pinned in packaging/requirements.lock with the sha256 of that
    very file (for each supported CPython), nothing else is bundled, and the manifest
    make-venv installs names each bundled file's hash."""
    lock = (ROOT / "packaging" / "requirements.lock").read_text()
    pinned = set(re.findall(r"^([a-z0-9-]+)==(\S+) \\$", lock, re.M))
    assert pinned and all(
        re.search(
            rf"^{re.escape(n)}=={re.escape(v)} \\\n    --hash=sha256:[0-9a-f]{{64}}", lock, re.M
        )
        for n, v in pinned
    )
    wheels = _extract_deb(packages.deb, tmp_path / "deb") / "usr/lib/gpud/wheels"
    bundled = {build._pin(w.name) for w in wheels.glob("*.whl")}
    assert bundled - {f"gpud=={_project_version()}"} == {f"{n}=={v}" for n, v in pinned}
    manifest = (wheels / "requirements.txt").read_text()
    for wheel in wheels.glob("*.whl"):
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if not wheel.name.startswith(("gpud-", "sdnotify-")):  # built here, not downloaded
            assert digest in lock, wheel.name
        if not wheel.name.startswith("pip-"):  # the installer runs from its wheel
            assert f"--hash=sha256:{digest}" in manifest, wheel.name
    assert not re.search(r"^pip==", manifest, re.M)


def _make_venv(wheels: Path, venv: Path, python: str = "/usr/bin/python3.11"):
    return _run(wheels.parent.parent.parent / "libexec/gpud/make-venv", venv, wheels, python,
                check=False, env={"PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.mark.timeout(BUILD_MARK_S)
def test_make_venv_refuses_a_tampered_wheel_and_an_unsupported_python(
    packages: Packages, tmp_path: Path
) -> None:
    """Nothing but the hashed files installs, and a failure leaves no half-built venv."""
    root = _extract_deb(packages.deb, tmp_path / "deb")
    wheels = root / "usr/lib/gpud/wheels"
    (victim,) = wheels.glob("msgspec-*-cp311-*.whl")
    victim.write_bytes(victim.read_bytes() + b"\0")
    venv = tmp_path / "venv"
    result = _make_venv(wheels, venv)
    assert result.returncode != 0 and "HASH" in result.stdout + result.stderr, result
    assert not venv.exists()
    # An interpreter the wheels are not for (the pytest run's, if it is not one) is refused.
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\necho 3.10\n")
    fake.chmod(0o755)
    result = _make_venv(wheels, venv, str(fake))
    assert result.returncode == 1 and "3.10" in result.stderr and "3.13 3.12 3.11" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line naming the cause
    assert not venv.exists()


@pytest.mark.timeout(BUILD_MARK_S)
def test_rpm_metadata_files_and_scriptlets(packages: Packages) -> None:
    requires = _run("rpm", "-qp", "--requires", packages.rpm).stdout.split("\n")
    assert "(/usr/bin/python3.13 or /usr/bin/python3.12 or /usr/bin/python3.11)" in requires
    assert "systemd" in requires
    provides = _run("rpm", "-qp", "--provides", packages.rpm).stdout.split("\n")
    assert f"bundled(serf) = {build.SERF_UPSTREAM_VERSION}" in provides
    packager = _run("rpm", "-qp", "--qf", "%{PACKAGER}", packages.rpm).stdout
    assert packager == build.MAINTAINER
    assert not any("ray" in r or "vllm" in r or r.startswith("/opt/") for r in requires), requires
    files = dict(
        line.split(" ", 1)
        for line in _run(
            "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME}"
            " %{FILEFLAGS:fflags}\n]", packages.rpm,
        ).stdout.splitlines()
    )  # fmt: skip
    assert files["/etc/gpud/gpud.toml"] == "-rw-r--r-- root cn"  # config(noreplace)
    assert files["/usr/libexec/gpud/serf"] == "-rwxr-xr-x root "
    mode, _, flags = files["/usr/share/doc/gpud/copyright"].rpartition(" ")
    assert mode == "-rw-r--r-- root" and "l" in flags  # %license
    license_ = _run("rpm", "-qp", "--qf", "%{LICENSE}", packages.rpm).stdout
    for term in ("Apache-2.0", "MPL-2.0", "MIT", "BSD-3-Clause", "PSF-2.0", "GPL-2.0-or-later"):
        assert term in license_, (term, license_)
    assert "localhost/gpud" not in _run("rpm", "-qip", packages.rpm).stdout
    assert files["/var/lib/gpud"] == "drwxr-x--- gpud "
    assert files["/run/gpud"] == "drwxr-x--- gpud g"
    assert files["/usr/lib/systemd/system/gpud.service"].startswith("-rw-r--r-- root")
    assert files["/usr/bin/gpud"].startswith("lrwxrwxrwx root")
    # The same staged tree: every file and link of the deb is in the rpm too.
    deb_files = {p for p, mode in _deb_contents(packages.deb).items() if not mode.startswith("d")}
    assert deb_files - set(files) == set()
    assert files["/usr/share/doc/gpud"].startswith("drwxr-xr-x root")
    for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN", "POSTTRANS"):
        body = _run("rpm", "-qp", "--qf", f"%{{{tag}}}", packages.rpm).stdout
        assert _run("sh", "-n", "-c", body, check=False).returncode == 0, f"{tag}:\n{body}"
    scripts = _run("rpm", "-qp", "--scripts", packages.rpm).stdout
    for semantics in ("systemctl --no-reload preset gpud.service",
                      "systemctl --no-reload disable --now gpud.service",
                      "systemctl try-restart gpud.service", "systemd-sysusers --replace=",
                      "/usr/libexec/gpud/make-venv", "rm -rf /opt/gpud"):  # fmt: skip
        assert semantics in scripts, semantics


@pytest.mark.timeout(BUILD_MARK_S)
@pytest.mark.skipif(os.geteuid() != 0, reason="rpm --root needs root")
def test_rpm_installs_into_scratch_root(packages: Packages, tmp_path: Path) -> None:
    """--nodeps: the scratch root's rpm database knows no python3.11 or systemd.
    --noscripts: the scriptlets would run chrooted into a root without /bin/sh; make-venv,
    what %posttrans runs, is run here on the installed wheels instead."""
    root = tmp_path / "root"
    _run("rpm", "--root", root, "--initdb")
    _run("rpm", "--root", root, "-i", "--nodeps", "--noscripts", packages.rpm)
    assert _run("rpm", "--root", root, "-q", "gpud").stdout.startswith("gpud-")
    assert (root / "usr/libexec/gpud/serf").read_bytes() == Path("/usr/bin/serf").read_bytes()
    assert os.readlink(root / "usr/bin/gpud") == "/opt/gpud/bin/gpud"
    assert (root / "etc/gpud/gpud.toml").read_text() == DEFAULT_CONFIG.read_text()
    assert (root / "usr/lib/systemd/system/gpud.service").read_text() == UNIT.read_text()
    venv = tmp_path / "venv"
    made = _make_venv(root / "usr/lib/gpud/wheels", venv)
    assert made.returncode == 0, made.stdout + made.stderr
    _assert_venv_is_self_contained(venv)


def _assert_venv_is_self_contained(venv: Path) -> None:
    """The venv imports gpud and its dependencies with nothing but the system interpreter."""
    probe = "import gpud.cli, aiohttp, msgspec, msgpack, pyroute2, sdnotify, pynvml, sys; print(sys.prefix)"
    result = _run(venv / "bin/python3", "-I", "-c", probe, env={"PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == str(venv)
    assert _run(venv / "bin/python3", "-I", "-c", "import ray", check=False).returncode != 0


# --- the deb, installed for real -----------------------------------------------------------


def _dpkg_status() -> str:
    result = _run("dpkg-query", "-W", "-f", "${Status} ${Version}", "gpud", check=False)
    return result.stdout if result.returncode == 0 else "not-installed"


@pytest.fixture(scope="module")
def installed_deb(packages: Packages) -> Iterator[Packages]:
    """The deb installed into / for the tests below, which run in file order (install,
    run, upgrade, remove, purge); purged at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("dpkg -i into / needs root")
    _need("dpkg", "systemctl", "systemd-sysusers", "deb-systemd-helper")
    if _dpkg_status() != "not-installed" or Path("/opt/gpud").exists():
        pytest.skip("gpud is already installed on this machine; not touching it")
    # A gpud system user may be left from an earlier purge (Debian keeps system users).
    try:
        _run("dpkg", "-i", packages.deb)
        yield packages
    finally:
        _run("dpkg", "--purge", "gpud", check=False)


def _run_agent_as_service_would(workdir: Path) -> None:
    """/usr/bin/gpud agent as user gpud with only CAP_NET_ADMIN (the unit's privileges), in a
    private netns (so its reserved-ports write touches no real host), with a NOTIFY_SOCKET
    this test listens on: READY=1 must come, then `gpud status` over the API socket."""
    bind_port, rpc_port, peer_port = free_ports(3)
    state, runtime = workdir / "state", workdir / "run"
    for directory in (state, runtime):
        directory.mkdir(mode=0o750)
        shutil.chown(directory, "gpud", "gpud")
    config = workdir / "gpud.toml"
    config.write_text(
        f'[node]\nname = "pkgtest"\nadvertise = "127.0.0.1"\n'
        f"[serf]\nbind_port = {bind_port}\nrpc_port = {rpc_port}\n"
        f"[peer]\nport = {peer_port}\n"
        f'[paths]\nstate_dir = "{state}"\nruntime_dir = "{runtime}"\n'
        f"[ray]\nenabled = false\n"
    )
    notify_path = workdir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    notify_path.chmod(0o666)
    listener.settimeout(1.0)
    command = (
        "ip link set lo up && exec setpriv --reuid=gpud --regid=gpud --init-groups "
        "--inh-caps=-all,+net_admin --ambient-caps=+net_admin --bounding-set=-all,+net_admin "
        f"/usr/bin/gpud agent --config {config}"
    )
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "NOTIFY_SOCKET": str(notify_path)}
    log = (workdir / "agent.log").open("w")
    agent = subprocess.Popen(["unshare", "--net", "sh", "-c", command], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
            if agent.poll() is not None:
                break
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                continue
        agent_log = (workdir / "agent.log").read_text()
        assert any("READY=1" in m for m in messages), f"no READY=1: {messages}\n{agent_log}"
        result = _run("/usr/bin/gpud", "status", "--json", "--socket", runtime / "gpud.sock",
                      check=False)  # fmt: skip
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{agent_log}"
        assert json.loads(result.stdout)["node"], result.stdout
        sock = os.stat(runtime / "gpud.sock")
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == grp.getgrnam("gpud").gr_gid
    finally:
        if agent.poll() is None:
            # The agent and its serf (a stop leaves serf running for the next gpud).
            kill_process_tree(agent.pid)
            agent.wait(timeout=10)
        listener.close()
        log.close()


def test_deb_installs_files_user_key_and_enables_unit(installed_deb: Packages) -> None:
    assert os.readlink("/usr/bin/gpud") == "/opt/gpud/bin/gpud"
    assert Path("/usr/lib/systemd/system/gpud.service").read_text() == UNIT.read_text()
    user = pwd.getpwnam("gpud")
    assert user.pw_dir == "/var/lib/gpud" and user.pw_shell.endswith("nologin")
    assert user.pw_uid < 1000 and grp.getgrgid(user.pw_gid).gr_name == "gpud"
    state = os.stat("/var/lib/gpud")
    assert (stat.S_IMODE(state.st_mode), state.st_uid) == (0o750, user.pw_uid)
    key = os.stat("/etc/gpud/cluster.key")
    # Root and the service only: operators are in group gpud.
    assert (stat.S_IMODE(key.st_mode), key.st_uid, key.st_gid) == (0o600, user.pw_uid, user.pw_gid)
    parse_key(Path("/etc/gpud/cluster.key").read_text(), source="/etc/gpud/cluster.key")
    assert WANTS_LINK.is_symlink()  # postinst enabled it, as Debian packages do
    grp.getgrnam("gpud-admin")  # api.admin_group's default
    # postinst built the venv from the wheels, byte-compiled, with the host's python3.
    assert list(VENV.glob("lib/python3.*/site-packages/gpud/__pycache__/*.pyc"))
    _assert_venv_is_self_contained(VENV)


def test_deb_unit_enables_and_verifies_without_systemd_running(installed_deb: Packages) -> None:
    _run("systemctl", "disable", "gpud")
    assert not WANTS_LINK.exists()
    _run("systemctl", "enable", "gpud")
    assert WANTS_LINK.is_symlink()
    verify = _run("systemd-analyze", "verify", "/usr/lib/systemd/system/gpud.service", check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_deb_agent_runs_with_the_units_privileges(installed_deb: Packages) -> None:
    _need("unshare", "setpriv", "ip")
    assert _run("/usr/bin/gpud", "version").stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="gpud-pkgtest-"))
    try:
        workdir.chmod(0o755)  # user gpud must reach the config and the notify socket
        _run_agent_as_service_would(workdir)
    finally:
        shutil.rmtree(workdir)


def test_deb_upgrade_keeps_config_and_key(installed_deb: Packages) -> None:
    config = Path("/etc/gpud/gpud.toml")
    key_text = Path("/etc/gpud/cluster.key").read_text()
    edited = config.read_text() + "\n# operator edit\n"
    config.write_text(edited)
    # As older versions left it: 0640 root:gpud, readable by the socket group's operators.
    gpud_user = pwd.getpwnam("gpud")
    os.chown("/etc/gpud/cluster.key", 0, gpud_user.pw_gid)
    os.chmod("/etc/gpud/cluster.key", 0o640)
    _run("dpkg", "-i", installed_deb.deb_upgrade)
    assert _dpkg_status() == f"install ok installed {_project_version()}-2"
    assert config.read_text() == edited
    assert Path("/etc/gpud/cluster.key").read_text() == key_text
    key = os.stat("/etc/gpud/cluster.key")
    assert (stat.S_IMODE(key.st_mode), key.st_uid) == (0o600, gpud_user.pw_uid)
    assert WANTS_LINK.is_symlink()


def test_deb_remove_keeps_state_and_purge_removes_it(installed_deb: Packages) -> None:
    _run("dpkg", "--remove", "gpud")
    assert _dpkg_status().startswith("deinstall ok config-files")
    assert not VENV.exists() and not Path("/usr/bin/gpud").exists()
    assert Path("/etc/gpud/gpud.toml").exists() and Path("/var/lib/gpud").exists()
    pwd.getpwnam("gpud")
    _run("dpkg", "--purge", "gpud")
    assert _dpkg_status() == "not-installed"
    for gone in ("/etc/gpud", "/var/lib/gpud", str(WANTS_LINK), "/etc/systemd/system/gpud.service"):
        assert not os.path.lexists(gone), gone
    # Debian keeps system users on purge: operators keep their group membership.
    pwd.getpwnam("gpud")
    grp.getgrnam("gpud")
