"""Startup, liveness and errors of a replica's server: the pure decisions (restart now?, what is
wrong, the elapsed time as shown) and, on real gpud + serf in the namespace harness with
tests/harness/deploy_server.py as the `command` engine: a server that sleeps before listening longer
than its `startup_timeout_s` is restarted (not before) and the problem quotes its last output;
one that sleeps less is never restarted, and `gpud deploy status` shows "starting (Ns)"
meanwhile; a crash-looping one shows its last error line in status and doctor; one whose
completions hang while /health stays green (`ready_check = "completion"`) is not ready, then
restarted; a local model path the host lacks is refused with the reason, never run.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.deployments import spec, views
from gpud.deployments.readiness import liveness_step, startup_step
from gpud.process_groups import proc_stat
from gpud.text import duration
from tests.harness import fake_nvml
from tests.harness.deployments import SERVER, operated_cluster
from tests.harness.gpud_node import GpudNode, wait_for

# ---- pure decisions ------------------------------------------------------------------------

seconds = st.floats(0, 10 * 86400, allow_nan=False)


@given(st.booleans(), st.booleans(), seconds, st.integers(*spec.STARTUP_TIMEOUT_BOUNDS))
def test_startup_step_restarts_only_a_server_silent_past_its_timeout(
    answered: bool, passed: bool, elapsed: float, timeout: int
) -> None:
    now_answered, restart = startup_step(answered, passed, elapsed, timeout)
    assert now_answered == (answered or passed)
    assert restart == (not now_answered and elapsed > timeout)
    if elapsed <= timeout:
        assert not restart  # never before its timeout


@given(st.lists(st.tuples(st.booleans(), seconds), max_size=30), st.integers(1, 3600))
def test_startup_step_once_answered_is_never_restarted_for_startup(
    rounds: list[tuple[bool, float]], timeout: int
) -> None:
    """Rounds of one start, in the order production judges them (elapsed only grows): after the
    first passed probe, no later round restarts it, whatever the clock says."""
    answered = False
    for passed, elapsed in sorted(rounds, key=lambda r: r[1]):
        before = answered
        answered, restart = startup_step(answered, passed, elapsed, timeout)
        if before or passed:
            assert answered and not restart


texts = st.text(max_size=8)


@given(st.lists(st.booleans(), max_size=40), st.integers(1, 5))
def test_liveness_restarts_after_rounds_in_a_row_without_a_passed_probe(
    rounds: list[bool], needed: int
) -> None:
    """Rounds in order, as production judges them; a restart is a fresh start. It restarts
    exactly when ``needed`` rounds in a row passed no probe, never in a round that passed."""
    silent = in_a_row = 0
    for passed in rounds:
        silent, restart = liveness_step(passed, silent, needed)
        in_a_row = 0 if passed else in_a_row + 1
        assert restart == (in_a_row >= needed)
        if restart:
            silent = in_a_row = 0


causes = st.sampled_from([("", ""), ("startup_timeout", "late"), ("unresponsive", "hung")])


@given(texts, causes, st.sampled_from(["", "starting", "running", "backoff", "failed"]), texts,
       st.integers(0, 64))  # fmt: skip
def test_trouble_names_the_first_cause_and_the_last_error_of_a_crash_loop(
    cannot_start: str, restarted: Any, state: str, last_error: str, failures: int
) -> None:
    code, text = views.trouble(cannot_start, restarted, state, last_error, failures)
    if cannot_start:
        assert (code, text) == ("cannot_start", cannot_start)
    elif restarted[0]:
        assert (code, text) == restarted
    elif last_error and (state in ("backoff", "failed") or failures >= views.CRASH_LOOP_FAILURES):
        # Crash-looping: the last error line shows even while the server runs between failures.
        assert (code, text) == ("server_failed", last_error)
    else:
        assert (code, text) == ("", "")


@given(st.integers(0, 10**7))
def test_duration_reads_back_as_the_same_whole_seconds(total: int) -> None:
    shown = duration(total + 0.99)
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", shown)
    assert match is not None, shown
    h, m, s = (int(g or 0) for g in match.groups())
    assert h * 3600 + m * 60 + s == total and m < 60 and s < 60
    assert (h == 0) or match.group(2) is not None  # "2h0m5s", never "2h5s"


# ---- real gpud + serf ----------------------------------------------------------------------


CRASH = [sys.executable, "-c", "import sys; print('loading'); sys.exit('boom: no weights')"]


def spec_text(name: str, sleep_s: float, timeout_s: int) -> str:
    command = [sys.executable, SERVER, "--port", "{port}", "--host", "{host_ip}"]
    command += ["--sleep-before-listen", str(sleep_s)]
    extra = ""
    if name == "crash":
        command = CRASH
    if name == "nomodel":
        extra = 'model = "/nonexistent/gpud-test-model"\n'
    if name == "hung":
        command += ["--hang-completions-after", "4"]
        extra = 'model = "test-model"\nready_check = "completion"\n'
    return (
        f'name = "{name}"\nengine = "command"\nreplicas = 1\nstartup_timeout_s = {timeout_s}\n'
        f"command = {json.dumps(command)}\n{extra}"
    )


def started_s(pid: int | None) -> float | None:
    """When ``pid`` started, in seconds since boot, if it runs (from /proc: the harness shares
    the pid namespace)."""
    stat = proc_stat(pid) if pid else None
    return stat.start / os.sysconf("SC_CLK_TCK") if stat is not None else None


def replica(node: GpudNode, name: str) -> dict[str, Any]:
    view = json.loads(node.cli("deploy", "status", name, "--json", check=False).stdout)
    return view["replica_views"][0]


def starting_for(node: GpudNode, name: str) -> int | None:
    """The seconds in "starting (Ns)" of `gpud deploy status NAME`, if shown."""
    shown = re.search(
        r"starting \((\d+)s\)", node.cli("deploy", "status", name, check=False).stdout
    )
    return int(shown.group(1)) if shown else None


def server(nodes: list[GpudNode], name: str, *, other_than: int = 0) -> tuple[GpudNode, int, float]:
    """The node that runs the replica's server (it alone knows its process), the server's pid
    (one other than ``other_than``) and when it started."""

    def found() -> tuple[GpudNode, int, float] | None:
        for node in nodes:
            pid = replica(node, name).get("pid")
            start = started_s(pid)
            if pid and pid != other_than and start is not None:
                return node, pid, start
        return None

    return wait_for(
        found,
        60,
        0.2,
        what=f"{name}'s server to start",
        describe=lambda: "\n".join(
            n.cli("deploy", "status", name, check=False).stdout for n in nodes
        ),
    )


@pytest.mark.netns
def test_a_server_late_past_its_startup_timeout_is_restarted_one_within_is_not(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(1))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    c, key_file = operated_cluster(cluster, tmp_path, 2, {"command_allow": [sys.executable]})
    a = c.nodes[0]
    for name, sleep_s, timeout_s in (
        ("late", 60, 3),
        ("slow", 8, 30),
        ("crash", 0, 60),
        ("hung", 0, 60),
        ("nomodel", 0, 60),
    ):
        path = tmp_path / f"{name}.toml"
        path.write_text(spec_text(name, sleep_s, timeout_s))
        a.cli("deploy", "apply", str(path), "--key", str(key_file))

    # Within its timeout: "starting (Ns)" in `gpud deploy status`, the elapsed time growing.
    slow, _, _ = server(c.nodes, "slow")
    first = wait_for(
        lambda: starting_for(slow, "slow"), 20, 0.5, what="slow's elapsed start time in the CLI"
    )
    later = wait_for(
        lambda: (n := starting_for(slow, "slow")) is not None and n > first and n,
        10,
        0.5,
        what="the elapsed start time to grow",
    )
    print(slow.cli("deploy", "status", "slow", check=False).stdout)
    view = replica(slow, "slow")
    assert view["startup_timeout_s"] == 30 and view["starting_s"] >= later, view
    assert "of startup_timeout_s 30s" in view["reason"], view

    # Past its timeout: restarted, not before its 3 s (by the processes' own start times), and
    # the problem quotes its output.
    late, pid, started = server(c.nodes, "late")
    _, _, restarted = server([late], "late", other_than=pid)
    assert restarted - started >= 3.0, (started, restarted)
    view = replica(late, "late")
    assert view["restarts"] >= 1, view
    assert "within startup_timeout_s = 3 s" in view["reason"], view
    assert "loading: listening in 60 s" in view["reason"], view
    print(late.cli("doctor", check=False).stdout)
    doctor = late.api("/v1/doctor")
    problems = [p for p in doctor["problems"] if p["code"] == "deployments.replica_startup_timeout"]
    assert problems and "loading: listening in 60 s" in problems[0]["message"], doctor

    # The one within its timeout gets ready and was never restarted.
    wait_for(
        lambda: replica(slow, "slow")["state"] == "ready",
        40,
        0.5,
        what="slow to get ready",
        describe=lambda: json.dumps(replica(slow, "slow")),
    )
    view = replica(slow, "slow")
    assert view["restarts"] == 0 and view["starting_s"] is None and view["reason"] == "", view

    # A crash-looping server: its last error line in `gpud deploy status` and doctor, also in
    # the moments it runs between two exits.
    crash = next(n for n in c.nodes if replica(n, "crash").get("restarts"))
    wait_for(lambda: replica(crash, "crash")["restarts"] >= 3, 30, 0.5, what="a crash loop")
    for _ in range(5):
        line = next(
            row
            for row in crash.cli("deploy", "status", "crash", check=False).stdout.splitlines()
            if row.strip().startswith("0 ")
        )
        assert "exited with code 1: boom: no weights" in line, line
    problems = [
        p for p in crash.api("/v1/doctor")["problems"] if p["code"] == "deployments.replica_failed"
    ]
    assert problems and "boom: no weights" in problems[0]["message"], problems
    assert "boom: no weights" in crash.cli("doctor", check=False).stdout

    # A server that answered, then hangs on completions while /health stays green: not ready
    # (the probe's completion got no answer), then restarted, its output quoted.
    hung, _, _ = server(c.nodes, "hung")

    def api_view() -> dict[str, Any]:
        return hung.api("/v1/deployments/hung")["replica_views"][0]

    wait_for(
        lambda: api_view()["state"] != "ready" and "completion" in api_view()["probe_error"],
        30,
        0.2,
        what="hung to be not ready for its completion",
        describe=lambda: json.dumps(api_view()),
    )
    view = wait_for(
        lambda: (v := api_view())["restarts"] >= 1 and "passed no probe" in v["reason"] and v,
        40,
        0.2,
        what="hung to be restarted",
        describe=lambda: json.dumps(api_view()),
    )
    assert "a worker died: completions hang" in view["reason"], view
    wait_for(
        lambda: any(
            p["code"] == "deployments.replica_unresponsive" and "passed no probe" in p["message"]
            for p in hung.api("/v1/doctor")["problems"]
        ),
        40,
        0.2,
        what="doctor to name the unresponsive replica",
    )

    # A local model path this host lacks: refused with the reason, its server never run.
    def refused() -> dict[str, Any] | None:
        found = [replica(n, "nomodel") for n in c.nodes]
        return next((v for v in found if "does not exist on this host" in v["reason"]), None)

    view = wait_for(refused, 30, 0.5, what="nomodel refused for its missing model path")
    assert view["state"] == "failed" and view["pid"] is None and view["restarts"] == 0, view
