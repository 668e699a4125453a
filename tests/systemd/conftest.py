"""The packages the nspawn tests install: built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.nspawn import build_debs, unusable


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The deb of revision 1 and of revision 2 (an upgrade), from one staged tree."""
    if reason := unusable():
        pytest.skip(reason)
    return build_debs(tmp_path_factory.mktemp("nspawn-debs"))
