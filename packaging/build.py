#!/usr/bin/env python3
"""Build gpud's deb and rpm from one staged tree.

    python3 packaging/build.py --out dist/

writes dist/gpud_<version>_<arch>.deb and dist/gpud-<version>.<arch>.rpm, where <version> is
<pyproject version>-<revision>. The staged tree holds gpud and its runtime dependencies (not
Ray) as wheels for every supported CPython (SUPPORTED_PYTHONS) at /usr/lib/gpud/wheels with a
hash manifest, the script that builds the virtualenv /opt/gpud from them with the host's
interpreter at install time (/usr/libexec/gpud/make-venv), /usr/bin/gpud, the systemd unit,
sysusers.d and tmpfiles.d entries, /etc/gpud/gpud.toml, the man page, the operator reference,
the copyright file listing every bundled distribution with its license, and the serf binary of
Debian's package (checked against SERF_SHA256) at /usr/libexec/gpud/serf (off PATH, so it
never meets a stand-alone serf).

Why wheels and not a venv: a venv's compiled extensions and interpreter link belong to one
CPython minor version, and the fleet runs several (Debian 12: 3.11, Ubuntu 24.04: 3.12,
Debian 13: 3.13). Every wheel comes from packaging/requirements.lock, which pins one version of
each distribution with the sha256 of its file for every (platform, CPython) pair.
"""

from __future__ import annotations

import argparse
import email.message
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
import zipfile
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGING = PROJECT / "packaging"
SYSTEMD = PROJECT / "systemd"

PREFIX = "/opt/gpud"
# The interpreters the wheels are bundled for, newest first (make-venv takes the host's python3
# if it is one of them, else the newest installed). The packages depend on any one of them.
SUPPORTED_PYTHONS = ("3.13", "3.12", "3.11")
# The interpreter this build runs pip, the wheel build and the man page's venv with.
BUILD_PYTHON = "/usr/bin/python3.11"
SERF_BINARY = Path("/usr/bin/serf")
SERF_COPYRIGHT = Path("/usr/share/doc/serf/copyright")
# The bundled serf: the binary of Debian 12's serf package, pinned by checksum per architecture
# (a rebuilt or different serf fails the build). Its source is serf 0.9.4; Debian's build does
# not stamp the version, so `serf version` reports "0.8.2-dev".
SERF_DEB_VERSION = "0.9.4~ds1-1+b13"
SERF_UPSTREAM_VERSION = "0.9.4"
SERF_SHA256 = {"x86_64": "25ae094d2266fd7acb5817d8a012284ae1afe5f09be3fd189b8ffb3254d2717e"}
COMMON_LICENSES = Path("/usr/share/common-licenses")
# Texts for a license a bundled wheel names without shipping it, where Debian's
# common-licenses has none (its BSD file is the University of California's own text).
LICENSE_TEXTS = {
    "BSD-3-Clause": """\
Redistribution and use in source and binary forms, with or without modification, are
permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of
   conditions and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials
   provided with the distribution.
3. Neither the name of the copyright holder nor the names of its contributors may be used
   to endorse or promote products derived from this software without specific prior
   written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION)
HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR
TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE,
EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
""",
}
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

MONITORING_DIR = "/usr/share/gpud/monitoring"
MONITORING_FILES = ("gpud-rules.yml", "gpud-dashboard.json")
# `gpud completion SHELL`, installed where each shell looks for it: zsh's vendor directory is
# vendor-completions on Debian and Ubuntu, site-functions on Fedora and RHEL.
COMPLETION_FILES = {
    "bash": ("usr/share/bash-completion/completions/gpud",),
    "zsh": ("usr/share/zsh/vendor-completions/_gpud", "usr/share/zsh/site-functions/_gpud"),
    "fish": ("usr/share/fish/vendor_completions.d/gpud.fish",),
}
STAGE_MARKER = ".gpud-stage-complete"
SERF_TARGET = "usr/libexec/gpud/serf"
WHEELS_TARGET = "usr/lib/gpud/wheels"
MAKE_VENV_TARGET = "usr/libexec/gpud/make-venv"
# What make-venv installs from the wheels: each distribution with the sha256 of its bundled
# files (computed here, after the downloads were checked against LOCK).
MANIFEST = "requirements.txt"
# pip itself is bundled as a wheel (locked like the rest) and run from it at install time, so
# the install needs no network, no ensurepip (python3-venv) and the same pip on every host.
INSTALLER = "pip"
# The bundled Python distributions: exact versions and the sha256 of every accepted wheel.
LOCK = PACKAGING / "requirements.lock"
# The demo's and test suite's virtualenv (scripts/setup.sh), locked the same way.
DEV_LOCK = PROJECT / "scripts" / "requirements.lock"
# Platforms whose wheels the lock lists (the packages are built on and for these).
LOCK_PLATFORMS = {
    "x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
}
MAINTAINER = "gpud developers <gpud-maintainers@users.noreply.github.com>"


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
    wheels = root / WHEELS_TARGET
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpud-wheel-") as scratch:
        gpud_wheel = _build_gpud_wheel(Path(scratch))
        shutil.copy(gpud_wheel, wheels)
        _bundle_locked_wheels(wheels, Path(scratch) / "downloads")
    _write_manifest(wheels)
    _install_make_venv(root / MAKE_VENV_TARGET)
    with tempfile.TemporaryDirectory(prefix="gpud-venv-") as scratch:
        # The install-time path, run here once: a venv from the bundled wheels (proves the
        # manifest installs and `pip check` passes), whose CLI then writes the man page.
        venv = Path(scratch) / "venv"
        run(root / MAKE_VENV_TARGET, venv, wheels, BUILD_PYTHON)
        man = cli_text(venv, "manpage")
        completions = {shell: cli_text(venv, "completion", shell) for shell in COMPLETION_FILES}
    distributions = bundled_distributions(wheels)
    _install(SERF_BINARY, root / SERF_TARGET)
    (root / SERF_TARGET).chmod(0o755)
    _write_copyright(root / "usr/share/doc/gpud/copyright", distributions)
    _write_gz(root / "usr/share/doc/gpud/changelog.gz", (PACKAGING / "changelog").read_bytes())
    _write_gz(root / "usr/share/man/man1/gpud.1.gz", man.encode())
    for shell, paths in COMPLETION_FILES.items():
        for path in paths:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(completions[shell])

    _install(SYSTEMD / "gpud.service", root / "usr/lib/systemd/system/gpud.service")
    _install(SYSTEMD / "gpud.sysusers", root / "usr/lib/sysusers.d/gpud.conf")
    _install(SYSTEMD / "gpud.tmpfiles", root / "usr/lib/tmpfiles.d/gpud.conf")
    _install(PACKAGING / "gpud.toml", root / "etc/gpud/gpud.toml")
    # The monitoring mixin: Prometheus alert rules and a Grafana dashboard, to copy from.
    for name in MONITORING_FILES:
        _install(PACKAGING / "monitoring" / name, root / MONITORING_DIR.lstrip("/") / name)
    # The operator reference (install, configuration, CLI, API); the build notes stay here.
    _install(PROJECT / "README.md", root / "usr/share/doc/gpud/README.md")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/gpud").symlink_to(f"{PREFIX}/bin/gpud")
    _normalize_modes(root)
    (root / STAGE_MARKER).touch()
    return root


def _build_gpud_wheel(scratch: Path) -> Path:
    # Build from a clean copy: setuptools reuses a build/ directory in the source tree, whose
    # stale modules would end up in the wheel.
    source = scratch / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "gpud"):
        if (PROJECT / name).is_dir():
            shutil.copytree(
                PROJECT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif (PROJECT / name).exists():
            shutil.copyfile(PROJECT / name, source / name)
    wheel_dir = scratch / "wheel"
    run(BUILD_PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheel_dir, source)
    (wheel,) = wheel_dir.glob("gpud-*.whl")
    return wheel


def _bundle_locked_wheels(wheels: Path, downloads: Path) -> None:
    """Every file LOCK pins, for this machine and each supported CPython, hash-checked against
    the lock; an sdist (sdnotify) is built into a wheel here, so the host never builds."""
    arch = machine_arch()
    if arch not in LOCK_PLATFORMS:
        raise SystemExit(
            f"build: {arch}: the lock has no wheels for it ({', '.join(LOCK_PLATFORMS)})"
        )
    for version in SUPPORTED_PYTHONS:
        abi = "cp" + version.replace(".", "")
        run(BUILD_PYTHON, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
            "-d", downloads, f"--python-version={version}", "--implementation=cp",
            f"--abi={abi}", "--abi=abi3", "--abi=none",
            *[f"--platform={p}" for p in LOCK_PLATFORMS[arch]], "-r", LOCK)  # fmt: skip
    for path in sorted(downloads.iterdir()):
        if path.name.endswith(".whl"):
            shutil.copy(path, wheels)
        else:
            run(BUILD_PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, path)


def _write_manifest(wheels: Path) -> None:
    """MANIFEST: every bundled distribution but the installer, pinned, with the sha256 of each
    of its files here (several per distribution: one per CPython for compiled ones)."""
    hashes: dict[str, set[str]] = {}
    for path in wheels.glob("*.whl"):
        hashes.setdefault(_pin(path.name), set()).add(hashlib.sha256(path.read_bytes()).hexdigest())
    lines = [
        f"# What {MAKE_VENV_TARGET.rsplit('/', 1)[1]} installs into {PREFIX} (from packaging/build.py)."
    ]
    for pin, digests in sorted(hashes.items()):
        if pin.split("==")[0] == INSTALLER:
            continue
        lines.append(f"{pin} " + " ".join(f"--hash=sha256:{d}" for d in sorted(digests)))
    (wheels / MANIFEST).write_text("\n".join(lines) + "\n")


def _install_make_venv(dest: Path) -> None:
    text = (PACKAGING / "make-venv").read_text()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.replace("@PYTHONS@", " ".join(SUPPORTED_PYTHONS)))
    dest.chmod(0o755)


@dataclass(frozen=True)  # build.py runs on the system python3: no msgspec here
class Distribution:
    """A bundled Python distribution as its wheel's metadata states it."""

    name: str
    version: str
    license: str  # SPDX expression
    authors: str
    license_text: str  # the wheel's license files, concatenated ("" if it ships none)


def bundled_distributions(wheels: Path) -> dict[str, Distribution]:
    """distribution name -> what its wheel states, for every bundled wheel but gpud's."""
    found: dict[str, Distribution] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            (metadata,) = [
                n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            ]
            meta = email.parser.Parser().parsestr(archive.read(metadata).decode(errors="replace"))
            info = metadata.split("/")[0]
            texts = [
                archive.read(n).decode(errors="replace").strip()
                for n in sorted(names)
                if n.startswith(f"{info}/") and not n.endswith("/")
                and re.search(r"(LICEN[CS]E|COPYING|NOTICE)[^/]*$", n, re.I)
            ]  # fmt: skip
        name = meta["Name"]
        if name == "gpud" or name in found:
            continue
        found[name] = Distribution(
            name=name,
            version=meta["Version"],
            license=_spdx_license(meta),
            authors=meta.get("Author") or meta.get("Author-email") or meta.get("Maintainer")
            or meta.get("Maintainer-email") or f"the {name} authors",
            license_text="\n\n".join(texts),
        )  # fmt: skip
    return found


def _spdx_license(meta: email.message.Message) -> str:
    """An SPDX expression, else an SPDX-looking License field, else the trove classifiers."""
    license_ = meta.get("License-Expression") or ""
    header = (meta.get("License") or "").strip()
    if not license_ and re.fullmatch(r"[A-Za-z0-9.+-]+-[0-9.]+(-or-later)?", header):
        license_ = header
    if not license_:
        license_ = _license_from_classifiers(meta.get_all("Classifier") or [])
    if not license_:
        raise SystemExit(f"build: {meta['Name']} {meta['Version']} states no license we can read")
    return license_


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


def dep5_expression(spdx: str) -> str:
    """An SPDX license expression in DEP-5 syntax (pure): lower-case `and`/`or`, and, as DEP-5
    has no parentheses, a parenthesised group joined with ", and"/", or" (its lowest precedence)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", spdx)
    words = [t.lower() if t in ("AND", "OR", "WITH") else t for t in tokens]
    if "(" not in words:
        return " ".join(words)
    # One level of grouping, e.g. "(A OR B) AND C" -> "A or B, and C".
    out: list[str] = []
    depth = 0
    for word in words:
        if word == "(":
            depth += 1
        elif word == ")":
            depth -= 1
        elif depth == 0 and word in ("and", "or") and out:
            out[-1] += ","
            out.append(word)
        else:
            out.append(word)
    return " ".join(out)


def _dep5_text(text: str) -> list[str]:
    """Continuation lines of a DEP-5 field: each line indented, empty lines as " ."."""
    lines = text.strip("\n").splitlines()
    return [f" {line.rstrip()}" if line.strip() else " ." for line in lines]


def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file (a Debian copyright file): field -> value, continuation
    lines kept with their leading space."""
    paragraphs: list[dict[str, str]] = []
    for block in re.split(r"\n[ \t]*\n", text.strip()):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            paragraphs.append(fields)
    return paragraphs


def _write_copyright(dest: Path, distributions: dict[str, Distribution]) -> None:
    """A machine-readable (DEP-5) copyright file: gpud, each bundled wheel, serf. Every license
    short name comes with its text: inline (a wheel's own license files) or in a stand-alone
    License paragraph (Debian's common licenses, serf's copyright file)."""
    paragraphs = [
        [
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
            "Upstream-Name: gpud",
            f"Upstream-Contact: {MAINTAINER}",
        ],
        ["Files: *", "Copyright: gpud developers", "License: Apache-2.0"],
    ]
    standalone: dict[str, list[str]] = {}  # short name -> its paragraph's continuation lines
    wanted = {"Apache-2.0"}
    for dist in sorted(distributions.values(), key=lambda d: d.name.lower()):
        expression = dep5_expression(dist.license)
        stem = re.sub(r"[-_.]+", "_", dist.name)
        paragraph = [
            f"Files: {WHEELS_TARGET}/{stem}-*.whl",
            f"Copyright: {dist.authors}",
            f"License: {expression}",
        ]
        if dist.license_text:
            paragraph += _dep5_text(dist.license_text)
        else:
            wanted |= set(re.findall(r"[^\s,]+", expression)) - {"and", "or", "with"}
        paragraph.append(
            f"Comment: {dist.name} {dist.version}; its files are installed into {PREFIX} "
            "at package installation."
        )
        paragraphs.append(paragraph)
    # serf: its copyright file's upstream paragraphs (not debian/*) describe the one binary.
    serf = _deb822_paragraphs(SERF_COPYRIGHT.read_text())
    serf_files = [p for p in serf[1:] if "Files" in p and not p["Files"].startswith("debian/")]
    serf_licenses = list(dict.fromkeys(p["License"].split("\n")[0] for p in serf_files))
    holders = [line.strip() for p in serf_files for line in p["Copyright"].splitlines()]
    paragraphs.append([
        f"Files: {SERF_TARGET}",
        "Copyright: " + "\n ".join(dict.fromkeys(h for h in holders if h)),
        f"License: {' and '.join(serf_licenses)}",
        f"Comment: the serf binary of Debian's serf {SERF_DEB_VERSION} package (serf "
        f"{SERF_UPSTREAM_VERSION}; it reports itself as 0.8.2-dev).",
    ])  # fmt: skip
    for p in serf:
        if "Files" not in p and "License" in p and "\n" in p["License"]:
            name, _, text = p["License"].partition("\n")
            standalone[name.strip()] = text.splitlines()
    for name in sorted(wanted - set(standalone)):
        common = COMMON_LICENSES / name
        if name in LICENSE_TEXTS:
            standalone[name] = _dep5_text(LICENSE_TEXTS[name])
        elif common.exists():
            standalone[name] = _dep5_text(common.read_text())
        else:
            raise SystemExit(
                f"build: {name}: a bundled wheel names it without its text; add the text to "
                "LICENSE_TEXTS in packaging/build.py"
            )
    for name, text in sorted(standalone.items()):
        paragraphs.append([f"License: {name}", *text])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n\n".join("\n".join(p) for p in paragraphs) + "\n")


def license_expression(distributions: dict[str, Distribution]) -> str:
    """The rpm License: every license in the payload, serf's MPL-2.0 included (pure)."""
    terms = {"Apache-2.0", "MPL-2.0"} | {
        f"({d.license})" if " " in d.license else d.license for d in distributions.values()
    }
    return " AND ".join(sorted(terms))


def cli_text(venv: Path, *args: str) -> str:
    """What the bundled CLI prints for ``args`` (its man page, its shell completion): both are
    generated from its own argparse parser, so they cannot drift from the CLI."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "80", "LC_ALL": "C.UTF-8"}  # same text everywhere
    return run(venv / "bin" / "gpud", *args, env=env)


def _write_gz(dest: Path, data: bytes) -> None:
    """gzip without a timestamp or name, so the same input gives the same bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)


def _install(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


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
        .replace("@PYTHON_DEPENDS@", " | ".join(f"python{v}" for v in SUPPORTED_PYTHONS))
        .replace("@PYTHON_LIST@", ", ".join(sorted(SUPPORTED_PYTHONS)))
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
    # gzip: the payload is mostly wheels, already compressed; xz would take minutes to gain 4%.
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb)
    return deb


def build_rpm(staged: Path, work: Path, out: Path, version: str) -> Path:
    upstream, _, release = version.partition("-")
    root = work / "rpm-root"
    _link_tree(staged, root)
    distributions = bundled_distributions(root / WHEELS_TARGET)
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
        .replace("@LICENSE@", license_expression(distributions))
        .replace("@PACKAGER@", MAINTAINER)
        .replace(
            "@PYTHON_REQUIRES@",
            "(" + " or ".join(f"/usr/bin/python{v}" for v in SUPPORTED_PYTHONS) + ")",
        )
        .replace("@SERF_VERSION@", SERF_UPSTREAM_VERSION)
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
    [project].dependencies and the installer, for every supported CPython) and DEV_LOCK (what
    scripts/setup.sh installs for the demo and the test suite on BUILD_PYTHON: those plus the
    test and ray extras)."""
    with open(PROJECT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    runtime = project["dependencies"]
    extras = project["optional-dependencies"]
    write_package_lock(runtime)
    _write_lock(
        DEV_LOCK,
        [*runtime, *extras["test"], *extras["ray"]],
        "what scripts/setup.sh installs (gpud's dependencies, its test tools and Ray)",
        (_build_python_version(),),
    )


def write_package_lock(runtime: list[str]) -> None:
    _write_lock(
        LOCK,
        [*runtime, INSTALLER],
        "the Python distributions the packages bundle (and pip, which installs them)",
        SUPPORTED_PYTHONS,
    )


def _build_python_version() -> str:
    return run(BUILD_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])").strip()


def _write_lock(lock: Path, requirements: list[str], what: str, pythons: tuple[str, ...]) -> None:
    """Write ``lock``: each distribution ``requirements`` resolve to (on BUILD_PYTHON), pinned,
    with the hashes of its files for every platform in LOCK_PLATFORMS and every CPython in
    ``pythons`` (one for pure-Python wheels and sdists)."""
    hashes: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="gpud-lock-") as scratch:
        resolved = Path(scratch) / "resolved"
        run(BUILD_PYTHON, "-m", "pip", "download", "--quiet", "-d", resolved, *requirements)
        pins = sorted({_pin(path.name) for path in resolved.iterdir()})
        for arch, platforms in LOCK_PLATFORMS.items():
            for version in pythons:
                dest = Path(scratch) / f"{arch}-{version}"
                abi = "cp" + version.replace(".", "")
                # --no-deps: the set is already resolved; each pin's file for this platform.
                run(BUILD_PYTHON, "-m", "pip", "download", "--quiet", "--no-deps", "-d", dest,
                    f"--python-version={version}", "--implementation=cp", f"--abi={abi}",
                    "--abi=abi3", *[f"--platform={p}" for p in platforms], *pins)  # fmt: skip
                for path in dest.iterdir():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    hashes.setdefault(_pin(path.name), set()).add(digest)
    covered = ", ".join(LOCK_PLATFORMS)
    if len(pythons) > 1:
        covered += f"; CPython {', '.join(sorted(pythons))}"
    lines = [
        "# Generated by `python3 packaging/build.py --update-lock`:",
        f"# {what}, pinned, with the sha256 of each accepted file ({covered}).",
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


def serf_mismatch(binary: Path, arch: str) -> str | None:
    """Why ``binary`` is not the pinned serf for ``arch``, or None if it is."""
    pinned = SERF_SHA256.get(arch)
    if pinned is None:
        return (
            f"no pinned serf for {arch}: add the sha256 of /usr/bin/serf from Debian's serf "
            f"{SERF_DEB_VERSION} ({arch}) to SERF_SHA256 in packaging/build.py"
        )
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    if digest != pinned:
        return (
            f"{binary} has sha256 {digest}, not the pinned {pinned} of Debian's serf "
            f"{SERF_DEB_VERSION}: install exactly that package version (apt-get install "
            f"serf={SERF_DEB_VERSION}) or, after checking the new build, update SERF_SHA256 "
            "and SERF_DEB_VERSION in packaging/build.py"
        )
    return None


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
    for tool in ("dpkg-deb", "rpmbuild", BUILD_PYTHON):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (Debian: apt-get install dpkg-dev rpm python3.11-venv)")
    for needed in (SERF_BINARY, SERF_COPYRIGHT):
        if not needed.exists():
            parser.error(f"{needed} not found: install Debian's serf package")
    if problem := serf_mismatch(SERF_BINARY, machine_arch()):
        parser.error(problem)
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
