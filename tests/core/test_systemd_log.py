"""Journal priorities and children's output: gpud's lines carry sd-daemon <N> prefixes exactly
when stderr is the journal, and serf's Go log lines become gpud lines at serf's level."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gpud import log


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "    2026/11/23 21:24:23 [INFO] agent: Serf agent starting",
            (logging.INFO, "Serf agent starting", {"source": "agent"}),
        ),
        (
            "    2026/11/23 21:24:23 [DEBUG] memberlist: Using dynamic bind port 43107",
            (logging.DEBUG, "Using dynamic bind port 43107", {"source": "memberlist"}),
        ),
        (
            "    2026/11/23 21:24:26 [WARN] serf: Shutdown without a Leave",
            (logging.WARNING, "Shutdown without a Leave", {"source": "serf"}),
        ),
        (
            "2026/11/23 21:24:26 [ERR] memberlist: Failed fallback ping: EOF",
            (logging.ERROR, "Failed fallback ping: EOF", {"source": "memberlist"}),
        ),
        ("==> Starting Serf agent...", (logging.INFO, "Starting Serf agent...", {})),
        (
            "==> Error starting agent: listen tcp 127.0.0.1:7374: bind: address already in use",
            (
                logging.ERROR,
                "Error starting agent: listen tcp 127.0.0.1:7374: bind: address already in use",
                {},
            ),
        ),
        ("                      Node name: 'vm'", (logging.INFO, "Node name: 'vm'", {})),
        ("", None),
        ("   \n", None),
    ],
)
def test_child_lines_keep_their_level_and_lose_their_timestamp(line: str, expected) -> None:  # type: ignore[no-untyped-def]
    assert log.parse_child_line(line) == expected


def test_priorities_follow_sd_daemon() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [log.priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_journal_is_detected_by_device_and_inode_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        fd = stream.fileno()
        assert log.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        assert not log.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd)
        assert not log.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd)
        assert not log.stderr_is_journal({}, fd)


_EMIT = """
import logging
from gpud import log
log.setup("debug")
logger = log.get("t")
log.error(logger, "broke", port=7951)
log.warning(logger, "odd")
log.info(logger, "fine")
logger.debug("detail")
log.child_output(log.get("serf"), "    2026/11/23 21:24:26 [WARN] serf: Shutdown without a Leave")
log.child_output(log.get("serf"), "")
"""


def _emit(tmp_path, journal: bool) -> list[str]:  # type: ignore[no-untyped-def]
    out = tmp_path / "stderr"
    with open(out, "w") as stderr:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", _EMIT], stderr=stderr, env=env, check=True)
    return out.read_text().splitlines()


def test_lines_carry_priorities_only_in_the_journal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    journal = _emit(tmp_path, journal=True)
    assert [line[:3] for line in journal] == ["<3>", "<4>", "<6>", "<7>", "<4>"]
    assert journal[0] == "<3>level=error component=t msg=broke port=7951"
    assert journal[4] == (
        '<4>level=warning component=serf msg="Shutdown without a Leave" source=serf'
    )
    plain = _emit(tmp_path, journal=False)
    assert plain == [line[3:] for line in journal]  # the same lines, without prefixes
