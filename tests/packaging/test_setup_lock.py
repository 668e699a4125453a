"""The test and demo environment is exactly the lock: scripts/setup.sh installs
scripts/requirements.lock with hashes, and this suite runs on what it pins."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "scripts" / "requirements.lock"
PIN = re.compile(
    r"^([A-Za-z0-9._-]+)==(\S+) \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\\n|\n|$))+", re.M
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    return {_norm(name): version for name, version in PIN.findall(LOCK.read_text())}


def test_every_requirement_of_the_project_and_its_extras_is_pinned_with_a_hash() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in ("test", "ray"):
        wanted += project["optional-dependencies"][extra]
    pins = _pins()
    for text in wanted:
        req = Requirement(text)
        name = _norm(req.name)
        assert name in pins, f"{name} is required by pyproject.toml but not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in the lock does not satisfy {text!r}: run "
            "`python3 packaging/build.py --update-lock`"
        )


def test_this_environment_is_exactly_the_lock() -> None:
    for name, version in _pins().items():
        installed = importlib.metadata.version(name)
        assert installed == version, (
            f"{name} {installed} is installed but the lock pins {version}: run scripts/setup.sh"
        )
