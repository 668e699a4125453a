#!/usr/bin/env python3
"""Build gpud's deb and rpm from one staged tree.

    python3 packaging/build.py --out dist/

writes dist/gpud_<version>_<arch>.deb and dist/gpud-<version>.<arch>.rpm, where <version> is
<pyproject version>-<revision>. The staged tree holds a self-contained virtualenv at
/opt/gpud (gpud and its runtime dependencies, not Ray), /usr/bin/gpud, the systemd unit,
sysusers.d and tmpfiles.d entries, /etc/gpud/gpud.toml, the man page, the copyright file
listing every bundled distribution with its license, and the serf binary of the installed
Debian package at /usr/libexec/gpud/serf (off PATH, so it never meets a stand-alone serf).

Virtualenvs are not relocatable, so the venv is built at the staging path with the target's
interpreter (/usr/bin/python3.11) and every reference to the staging path is then rewritten
to /opt/gpud; the build fails if one is left. Byte-code is not shipped (it would record the
staging path): the maintainer scripts compile it on the target.
"""

from __future__ import annotations

import argparse
import email.parser
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGING = PROJECT / "packaging"
SYSTEMD = PROJECT / "systemd"

PREFIX = "/opt/gpud"
# The venv's compiled extensions are built for this interpreter, so the packages depend on
# exactly this version (Debian: python3.11; RHEL 9: the python3.11 AppStream package).
PYTHON = "/usr/bin/python3.11"
SERF_BINARY = Path("/usr/bin/serf")
SERF_COPYRIGHT = Path("/usr/share/doc/serf/copyright")
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

MONITORING_DIR = "/usr/share/gpud/monitoring"
MONITORING_FILES = ("gpud-rules.yml", "gpud-dashboard.json")
STAGE_MARKER = ".gpud-stage-complete"
SERF_TARGET = "usr/libexec/gpud/serf"
# The bundled Python distributions: exact versions and the sha256 of every accepted wheel.
LOCK = PACKAGING / "requirements.lock"
# The demo's and test suite's virtualenv (scripts/setup.sh), locked the same way.
DEV_LOCK = PROJECT / "scripts" / "requirements.lock"
# Platforms whose wheels the lock lists (the packages are built on and for these).
LOCK_PLATFORMS = {
    "x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
}
MAINTAINER = "gpud developers <gpud@localhost>"
# What the venv keeps in bin/: gpud and the interpreter links the maintainer scripts use.
KEEP_IN_BIN = {"gpud", "python", "python3", "python3.11"}


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(
            f"build: {' '.join(map(str, cmd))} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result.stdout


def project_version() -> str:
    with open(PROJECT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def machine_arch() -> str:
    return os.uname().machine


def stage(root: Path) -> Path:
    """Build the staged install tree at ``root`` (replaced if present) and return it."""
    if root.exists():
        shutil.rmtree(root)
    venv = root / PREFIX.lstrip("/")
    venv.parent.mkdir(parents=True)
    run(PYTHON, "-m", "venv", venv)
    python = venv / "bin" / "python3"
    with tempfile.TemporaryDirectory(prefix="gpud-wheel-") as scratch:
        # Build from a clean copy: setuptools reuses a build/ directory in the source tree,
        # whose stale modules would end up in the wheel.
        source = Path(scratch) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "gpud"):
            if (PROJECT / name).is_dir():
                shutil.copytree(
                    PROJECT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            elif (PROJECT / name).exists():
                shutil.copyfile(PROJECT / name, source / name)
        wheel_dir = Path(scratch) / "wheel"
        run(python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheel_dir, source)
        (wheel,) = wheel_dir.glob("gpud-*.whl")
        # The dependencies exactly as locked (versions and wheel hashes), then gpud itself;
        # `pip check` proves the lock satisfies [project].dependencies (Ray stays out).
        # --use-pep517: an sdist (sdnotify) is built into a wheel, so it installs with a
        # dist-info (its license is read from there) instead of a legacy egg-info.
        run(python, "-m", "pip", "install", "--quiet", "--no-compile", "--no-deps",
            "--require-hashes", "--use-pep517", "-r", LOCK)  # fmt: skip
        run(python, "-m", "pip", "install", "--quiet", "--no-compile", "--no-deps", wheel)
        run(python, "-m", "pip", "check")
    run(python, "-m", "pip", "uninstall", "--quiet", "--yes", "pip", "setuptools")
    _prune_payload(venv)
    man = man_page(venv)  # before relocation: the scripts still run from the staging path
    _make_relocated(venv, str(venv), PREFIX)
    licenses = bundled_licenses(venv)
    _write_copyright(root / "usr/share/doc/gpud/copyright", licenses)
    _install(SERF_BINARY, root / SERF_TARGET)
    (root / SERF_TARGET).chmod(0o755)
    _write_gz(root / "usr/share/doc/gpud/changelog.gz", (PACKAGING / "changelog").read_bytes())
    _write_gz(root / "usr/share/man/man1/gpud.1.gz", man.encode())

    _install(SYSTEMD / "gpud.service", root / "usr/lib/systemd/system/gpud.service")
    _install(SYSTEMD / "gpud.sysusers", root / "usr/lib/sysusers.d/gpud.conf")
    _install(SYSTEMD / "gpud.tmpfiles", root / "usr/lib/tmpfiles.d/gpud.conf")
    _install(PACKAGING / "gpud.toml", root / "etc/gpud/gpud.toml")
    # The monitoring mixin: Prometheus alert rules and a Grafana dashboard, to copy from.
    for name in MONITORING_FILES:
        _install(PACKAGING / "monitoring" / name, root / MONITORING_DIR.lstrip("/") / name)
    _install(PACKAGING / "README.md", root / "usr/share/doc/gpud/README.md")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/gpud").symlink_to(f"{PREFIX}/bin/gpud")
    _normalize_modes(root)
    (root / STAGE_MARKER).touch()
    return root


def _prune_payload(venv: Path) -> None:
    """Drop what gpud never runs: other console scripts, activate*, C headers, test suites."""
    for path in (venv / "bin").iterdir():
        if path.name not in KEEP_IN_BIN:
            path.unlink()
    shutil.rmtree(venv / "include", ignore_errors=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for path in sorted(site.rglob("*"), reverse=True):
        if path.suffix in (".h", ".c", ".pyx", ".pxd") and path.is_file():
            path.unlink()
        elif path.is_dir() and path.name in ("tests", "test") and path.parent != site:
            shutil.rmtree(path)
    for path in site.glob("*/_test*.py"):
        path.unlink()


def bundled_licenses(venv: Path) -> dict[str, tuple[str, str]]:
    """distribution -> (version, SPDX license) for every distribution in the venv."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    found: dict[str, tuple[str, str]] = {}
    for metadata in sorted(site.glob("*.dist-info/METADATA")):
        meta = email.parser.Parser().parsestr(metadata.read_text(errors="replace"))
        name = meta["Name"]
        # An SPDX expression, else an SPDX-looking License field, else the trove classifiers.
        license_ = meta.get("License-Expression") or ""
        header = (meta.get("License") or "").strip()
        if not license_ and re.fullmatch(r"[A-Za-z0-9.+-]+-[0-9.]+(-or-later)?", header):
            license_ = header
        if not license_:
            license_ = _license_from_classifiers(meta.get_all("Classifier") or [])
        if not license_:
            raise SystemExit(f"build: {name} {meta['Version']} states no license we can read")
        found[name] = (meta["Version"], license_)
    return found


_CLASSIFIER_SPDX = {
    "Apache Software License": "Apache-2.0",
    "MIT License": "MIT",
    "BSD License": "BSD-3-Clause",
    "Python Software Foundation License": "PSF-2.0",
    "GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
}


def _license_from_classifiers(classifiers: list[str]) -> str:
    spdx = [
        _CLASSIFIER_SPDX[c.rsplit(" :: ", 1)[-1]]
        for c in classifiers
        if c.startswith("License ::") and c.rsplit(" :: ", 1)[-1] in _CLASSIFIER_SPDX
    ]
    return " OR ".join(dict.fromkeys(spdx))


def _write_copyright(dest: Path, licenses: dict[str, tuple[str, str]]) -> None:
    """A machine-readable (DEP-5) copyright file: gpud, each bundled distribution, serf."""
    lines = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        "Upstream-Name: gpud",
        f"Upstream-Contact: {MAINTAINER}",
        "",
        "Files: *",
        "Copyright: gpud developers",
        "License: Apache-2.0",
        "",
    ]
    for name, (version, license_) in sorted(licenses.items(), key=lambda i: i[0].lower()):
        if name == "gpud":
            continue
        lines += [
            f"Files: opt/gpud/lib/python3.11/site-packages/{name} {version}",
            f"Copyright: the {name} authors (see its dist-info directory)",
            f"License: {license_}",
            "",
        ]
    lines += [
        f"Files: {SERF_TARGET}",
        "Copyright: HashiCorp, Inc. (Debian's serf package; its copyright file follows)",
        "License: MPL-2.0",
        "",
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n" + SERF_COPYRIGHT.read_text())


def license_expression(licenses: dict[str, tuple[str, str]]) -> str:
    """The rpm License: every license in the payload, serf's MPL-2.0 included (pure)."""
    terms = {"Apache-2.0", "MPL-2.0"} | {
        f"({lic})" if " " in lic else lic for _, lic in licenses.values()
    }
    return " AND ".join(sorted(terms))


def man_page(venv: Path) -> str:
    """gpud(1), from the CLI's own --help output (so it cannot drift from the CLI)."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "80", "LC_ALL": "C.UTF-8"}  # same text everywhere

    def helptext(*args: str) -> str:
        return run(venv / "bin" / "gpud", *args, "--help", env=env)

    top = helptext()
    commands = dict.fromkeys(re.findall(r"^    ([a-z]+)\s", top, re.M))
    sections = [(f"gpud {c}", helptext(c)) for c in commands]
    out = [
        '.TH GPUD 1 "" "gpud" "User Commands"',
        ".SH NAME",
        "gpud \\- node daemon for GPU clusters",
        ".SH SYNOPSIS",
        ".nf",
        _roff(top),
        ".fi",
    ]
    for title, text in sections:
        out += [f".SH {title.upper()}", ".nf", _roff(text), ".fi"]
    out += [
        ".SH FILES",
        "/etc/gpud/gpud.toml, /etc/gpud/cluster.key, /run/gpud/gpud.sock, /var/lib/gpud",
        ".SH SEE ALSO",
        "/usr/share/doc/gpud/README.md",
    ]
    return "\n".join(out) + "\n"


def _roff(text: str) -> str:
    """``text`` as literal roff lines: backslashes escaped, no line read as a request."""
    lines = [line.replace("\\", "\\e") for line in text.splitlines()]
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def _write_gz(dest: Path, data: bytes) -> None:
    """gzip without a timestamp or name, so the same input gives the same bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)


def _install(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _make_relocated(venv: Path, staged: str, target: str) -> None:
    """Point the venv at ``target``: scripts' shebangs, activate scripts, pyvenv.cfg."""
    for path in venv.rglob("*"):
        if path.is_dir() and path.name == "__pycache__":
            shutil.rmtree(path)
    for path in venv.rglob("direct_url.json"):
        path.unlink()  # records the temporary wheel's path; optional metadata
    old, new = staged.encode(), target.encode()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))
    leftovers = [
        str(p)
        for p in venv.rglob("*")
        if p.is_file() and not p.is_symlink() and old in p.read_bytes()
    ]
    if leftovers:
        raise SystemExit(f"build: staging path {staged} still referenced in: {leftovers[:5]}")


def _normalize_modes(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


def _link_tree(src: Path, dest: Path) -> None:
    """A hard-linked copy of the staged tree (the package tools only read it)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True, copy_function=os.link)
    (dest / STAGE_MARKER).unlink()


def build_deb(staged: Path, work: Path, out: Path, version: str) -> Path:
    root = work / "deb-root"
    _link_tree(staged, root)
    control = root / "DEBIAN"
    control.mkdir()
    size_kib = sum(p.lstat().st_size for p in root.rglob("*")) // 1024
    (control / "control").write_text(
        (PACKAGING / "deb" / "control.in")
        .read_text()
        .replace("@VERSION@", version)
        .replace("@ARCH@", DEB_ARCH.get(machine_arch(), machine_arch()))
        .replace("@INSTALLED_SIZE@", str(size_kib))
        .replace("@MAINTAINER@", MAINTAINER)
    )
    (control / "conffiles").write_text("/etc/gpud/gpud.toml\n")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copyfile(PACKAGING / "deb" / script, control / script)
        (control / script).chmod(0o755)
    sums = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "DEBIAN" or path.is_symlink() or not path.is_file():
            continue
        sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    (control / "md5sums").write_text("".join(sums))
    deb = out / f"gpud_{version}_{DEB_ARCH.get(machine_arch(), machine_arch())}.deb"
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, deb)
    return deb


def build_rpm(staged: Path, work: Path, out: Path, version: str) -> Path:
    upstream, _, release = version.partition("-")
    root = work / "rpm-root"
    _link_tree(staged, root)
    licenses = bundled_licenses(root / PREFIX.lstrip("/"))
    topdir = work / "rpmbuild"
    if topdir.exists():
        shutil.rmtree(topdir)
    spec = work / "gpud.spec"
    spec.write_text(
        (PACKAGING / "rpm" / "gpud.spec.in")
        .read_text()
        .replace("@VERSION@", upstream)
        .replace("@RELEASE@", release or "1")
        .replace("@STAGE@", str(root))
        .replace("@SYSUSERS@", (SYSTEMD / "gpud.sysusers").read_text().strip())
        .replace("@LICENSE@", license_expression(licenses))
        .replace("@PACKAGER@", MAINTAINER)
    )
    run(
        "rpmbuild", "-bb", "--quiet",
        "--define", f"_topdir {topdir}",
        "--target", machine_arch(),
        spec,
    )  # fmt: skip
    (built,) = (topdir / "RPMS").rglob("*.rpm")
    rpm = out / f"gpud-{version}.{machine_arch()}.rpm"
    shutil.move(built, rpm)
    return rpm


def update_lock() -> None:
    """Resolve the dependencies again and write both locks: LOCK (what the packages bundle:
    [project].dependencies) and DEV_LOCK (what scripts/setup.sh installs for the demo and the
    test suite: those plus the test and ray extras)."""
    with open(PROJECT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    runtime = project["dependencies"]
    extras = project["optional-dependencies"]
    _write_lock(LOCK, runtime, "the Python distributions the packages bundle")
    _write_lock(
        DEV_LOCK,
        [*runtime, *extras["test"], *extras["ray"]],
        "what scripts/setup.sh installs (gpud's dependencies, its test tools and Ray)",
    )


def _write_lock(lock: Path, requirements: list[str], what: str) -> None:
    """Write ``lock``: each distribution ``requirements`` resolve to, pinned, with the hashes of
    its files for every platform in LOCK_PLATFORMS (one for pure-Python wheels and sdists)."""
    hashes: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="gpud-lock-") as scratch:
        resolved = Path(scratch) / "resolved"
        run(PYTHON, "-m", "pip", "download", "--quiet", "-d", resolved, *requirements)
        pins = sorted({_pin(path.name) for path in resolved.iterdir()})
        for arch, platforms in LOCK_PLATFORMS.items():
            dest = Path(scratch) / arch
            # --no-deps: the set is already resolved; each pin's file for this platform.
            run(PYTHON, "-m", "pip", "download", "--quiet", "--no-deps", "-d", dest,
                "--python-version=3.11", "--implementation=cp", "--abi=cp311", "--abi=abi3",
                *[f"--platform={p}" for p in platforms], *pins)  # fmt: skip
            for path in dest.iterdir():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                hashes.setdefault(_pin(path.name), set()).add(digest)
    lines = [
        "# Generated by `python3 packaging/build.py --update-lock`:",
        f"# {what}, pinned, with the sha256 of each accepted file "
        f"({', '.join(LOCK_PLATFORMS)}).",
    ]
    for pin, digests in sorted(hashes.items()):
        lines.append(f"{pin} \\")
        lines += [f"    --hash=sha256:{d} \\" for d in sorted(digests)]
        lines[-1] = lines[-1].removesuffix(" \\")
    lock.write_text("\n".join(lines) + "\n")


def _pin(filename: str) -> str:
    """ "name==version" from a wheel's or an sdist's file name (pure)."""
    stem = filename.removesuffix(".tar.gz") if filename.endswith(".tar.gz") else filename
    name, version = stem.split("-")[:2] if stem.endswith(".whl") else stem.rsplit("-", 1)
    return f"{name.replace('_', '-').lower()}=={version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "dist", help="where packages go")
    parser.add_argument("--revision", default="1", help="package revision (default 1)")
    parser.add_argument(
        "--work", type=Path, help="build directory (default: a temporary one, removed after)"
    )
    parser.add_argument(
        "--reuse-stage", action="store_true",
        help="reuse a complete staged tree from an earlier build in --work",
    )  # fmt: skip
    parser.add_argument(
        "--update-lock", action="store_true",
        help=f"re-resolve the dependencies into {LOCK.relative_to(PROJECT)} and "
        f"{DEV_LOCK.relative_to(PROJECT)}, and exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.update_lock:
        update_lock()
        print(f"wrote {LOCK} and {DEV_LOCK}")
        return 0
    for tool in ("dpkg-deb", "rpmbuild", PYTHON):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (Debian: apt-get install dpkg-dev rpm python3.11-venv)")
    for needed in (SERF_BINARY, SERF_COPYRIGHT):
        if not needed.exists():
            parser.error(f"{needed} not found: install Debian's serf package")
    if not args.revision.isalnum():
        parser.error(f"--revision {args.revision!r}: letters and digits only")
    version = f"{project_version()}-{args.revision}"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="gpud-pkg-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        staged = work / "stage"
        if not (args.reuse_stage and (staged / STAGE_MARKER).exists()):
            stage(staged)
        staged_s = time.monotonic() - started
        deb = build_deb(staged, work, out, version)
        rpm = build_rpm(staged, work, out, version)
        total_s = time.monotonic() - started
    for package in (deb, rpm):
        print(f"{package}  {package.stat().st_size / 1e6:.1f} MB")
    print(f"staged in {staged_s:.1f} s, total {total_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
