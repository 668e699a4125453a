"""`systemctl reload gpud` (SIGHUP) against a real agent: the live settings change at once with
RELOADING=1 ... READY=1, the others are named as needing a restart, and a bad file changes
nothing."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.harness.agent import RunningAgent
from tests.harness.serf import free_port


def _wait_log(agent: RunningAgent, pattern: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, agent.log_text()):
            return match.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the log:\n{agent.log_text()}")


def _reload(agent: RunningAgent) -> None:
    agent.messages.clear()  # so READY=1 below is the one that ends this reload
    os.kill(agent.proc.pid, signal.SIGHUP)
    agent.wait_message("RELOADING=1")
    agent.wait_message("READY=1")


def test_reload_applies_live_settings_and_names_the_rest(agent: RunningAgent) -> None:
    agent.wait_message("READY=1")
    original = agent.config_path.read_text()
    unused = free_port()
    edited = (
        original.replace("[serf]\n", f'[serf]\n            retry_join = ["127.0.0.1:{unused}"]\n')
        .replace("[ray]\n", "[ray]\n            priority = 3\n")
        .replace("[node]\n", '[node]\n            interface = "lo"\n')
    )
    edited = 'log_level = "debug"\n' + edited
    agent.config_path.write_text(edited)
    _reload(agent)
    applied = _wait_log(agent, r"msg=reloaded applied=\S+")
    fields = set(applied.removeprefix("msg=reloaded applied=").split(","))
    assert fields == {"log_level", "serf.retry_join", "ray.priority"}, applied
    restart = _wait_log(agent, r"level=warning component=agent msg=\S+ .*fields=\S+")
    assert "fields=node.interface" in restart and "systemctl restart gpud" in restart
    _wait_log(agent, rf"msg=\"?join failed\"? addrs=127.0.0.1:{unused}")  # tried at once
    # Gossiped without a restart (the member view follows serf's coalesced events).
    deadline = time.monotonic() + 15
    while agent.api("GET", "/v1/members")["members"][0]["tags"]["pri"] != 3:
        assert time.monotonic() < deadline, agent.api("GET", "/v1/members")
        time.sleep(0.3)

    # A broken file is refused and changes nothing; the agent keeps running.
    agent.config_path.write_text("[ports]\nblock_size = 1\n")
    _reload(agent)
    refused = _wait_log(agent, r"level=error component=agent msg=\"reload refused.*")
    assert "ports.block_size" in refused
    assert agent.proc.poll() is None
    assert agent.api("GET", "/v1/members")["members"][0]["tags"]["pri"] == 3
