"""`gpud agent --check-config` on bad files: each gives exit 2 and one line that names the key,
the value and what is allowed; a good file prints ok. What only this host can tell (groups,
executables, interfaces, the kernel's ephemeral range) is checked against this host."""

from __future__ import annotations

import base64
import grp
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import cli, config
from gpud.context import NodeContext
from gpud.preflight import ephemeral_overlap, read_ephemeral_range
from gpud.serf.agent import SerfAgent
from tests.harness.config import merge, to_toml
from tests.harness.serf import node_config, running
from tests.harness.tls import tls_files
from tests.harness.wait import async_wait_for

EPHEMERAL = read_ephemeral_range()
MISSING_GROUP = f"gpud-test-{uuid.uuid4().hex[:8]}"
MISSING_INTERFACE = "gpudnosuch0"
OPERATOR = base64.b64encode(os.urandom(32)).decode()
SERF = shutil.which("serf")


def base(tmp_path: Path) -> dict[str, Any]:
    """A config every check passes on this host: groups that exist, the serf on PATH."""
    return {
        "node": {"name": "n1"},
        "cluster": {"insecure": True},
        "api": {"socket_group": "root", "admin_group": "root"},
        "paths": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")},
        "serf": {"binary": SERF},
        "ray": {"enabled": False},
        "deployments": {"operators": [OPERATOR], "command_allow": [sys.executable]},
    }


def _ephemeral_cases() -> list[Any]:
    if EPHEMERAL is None:
        return []
    low, high = EPHEMERAL
    return [
        pytest.param(
            {"ports": {"range_start": low - 400, "range_end": low + 400, "block_size": 100}},
            "ports.range_end",
            [f"= {low + 400}", "ip_local_port_range", f"{low}-{high}"],
            id="ports-end-in-ephemeral",
        ),
        pytest.param(
            {"ports": {"range_start": low + 1, "range_end": low + 801, "block_size": 100}},
            "ports.range_start",
            [f"= {low + 1}", "ip_local_port_range"],
            id="ports-start-in-ephemeral",
        ),
    ]


# (snippet: TOML text or overrides of `base`, the key the line must name, other needles).
BAD: list[Any] = [
    pytest.param({"node": {"nmae": "x"}}, "node.nmae", ["did you mean `node.name`?"], id="typo"),
    pytest.param({"nodes": {"name": "x"}}, "nodes", ["did you mean `node`?"], id="typo-table"),
    pytest.param('log_levle = "debug"\n', "log_levle", ["`log_level`?"], id="typo-top-level"),
    pytest.param(
        {"serf": {"block_size": 100}}, "serf.block_size", ["`ports.block_size`?"], id="wrong-table"
    ),
    pytest.param(
        {"node": {"zzz": 1}}, "node.zzz", ["name, advertise, interface"], id="unknown-no-match"
    ),
    pytest.param(
        {"ray": {"head": "always"}},
        "ray.head",
        ['= "always"', '"auto", "prefer", "never"'],
        id="enum-ray-head",
    ),
    pytest.param(
        {"log_level": "loud"},
        "log_level",
        ['= "loud"', '"debug", "info", "warning", "error"'],
        id="enum-log-level",
    ),
    pytest.param(
        {"ports": {"block_size": "big"}}, "ports.block_size", ['= "big"', "`int`"], id="type"
    ),
    pytest.param({"ports": {"block_size": 2}}, "ports.block_size", ["= 2", ">= 8"], id="bound"),
    pytest.param(
        {"ports": {"range_start": 30000, "range_end": 20000}},
        "ports.range_start",
        ["30000 is greater than ports.range_end = 20000"],
        id="range-reversed",
    ),
    pytest.param(
        {"ports": {"range_start": 30000, "range_end": 30010}},
        "ports.block_size",
        ["= 400", "30000-30010 (10 ports)"],
        id="block-bigger-than-range",
    ),
    pytest.param(
        {"peer": {"port": 7951}}, "peer.port", ["= 7951: already serf.bind_port"], id="port-dup"
    ),
    pytest.param(
        {"serf": {"rpc_port": 21000}},
        "serf.rpc_port",
        ["= 21000: inside the ports range 20000-32000"],
        id="port-in-range",
    ),
    *_ephemeral_cases(),
    pytest.param(
        {"api": {"socket_group": MISSING_GROUP}},
        "api.socket_group",
        [f"groupadd --system {MISSING_GROUP}"],
        id="socket-group-missing",
    ),
    pytest.param(
        {"api": {"admin_group": MISSING_GROUP}},
        "api.admin_group",
        [f"groupadd --system {MISSING_GROUP}"],
        id="admin-group-missing",
    ),
    pytest.param(
        {"serf": {"binary": "/nonexistent/serf"}},
        "serf.binary",
        ['"/nonexistent/serf"', "not an executable"],
        id="serf-missing",
    ),
    pytest.param(
        {"ray": {"enabled": True, "executable": "/nonexistent/ray"}},
        "ray.executable",
        ['"/nonexistent/ray"', "ray.enabled = false"],
        id="ray-missing",
    ),
    pytest.param(
        {"node": {"interface": MISSING_INTERFACE}},
        "node.interface",
        [f'"{MISSING_INTERFACE}"', "it has: ", "lo"],
        id="interface-missing",
    ),
    pytest.param(
        {"deployments": {"operators": ["not base64!"]}},
        "deployments.operators",
        ["'not base64!'", "gpud deploy keygen"],
        id="operator-not-base64",
    ),
    pytest.param(
        {"deployments": {"operators": [base64.b64encode(b"short").decode()]}},
        "deployments.operators",
        ["base64 of 32 bytes"],
        id="operator-wrong-length",
    ),
    pytest.param(
        {"deployments": {"command_allow": ["python3"]}},
        "deployments.command_allow",
        ["'python3' is not an absolute path"],
        id="command-allow-relative",
    ),
    pytest.param(
        {"deployments": {"vllm_executable": "/nonexistent/vllm"}},
        "deployments.vllm_executable",
        ["not an executable file"],
        id="vllm-missing",
    ),
    pytest.param(
        {"serf": {"retry_join": ["-gpu-02-"]}}, "serf.retry_join", ["'-gpu-02-'"], id="join-name"
    ),
    pytest.param(
        {"serf": {"retry_join": ["gpu-02:70000"]}},
        "serf.retry_join",
        ["'gpu-02:70000'", "1-65535"],
        id="join-port",
    ),
    pytest.param(
        {"serf": {"retry_join": ["10.0.0.300"]}},
        "serf.retry_join",
        ["'10.0.0.300'"],
        id="join-bad-ipv4",
    ),
    pytest.param(
        {"node": {"advertise": "eth0"}}, "node.advertise", ["'eth0'", '"auto"'], id="advertise"
    ),
    pytest.param(
        {"node": {"name": "gpu 01"}}, "node.name", ["'gpu 01' contains ' '"], id="node-name"
    ),
]


def write(tmp_path: Path, snippet: str | Mapping[str, Any]) -> Path:
    """The base config with ``snippet`` merged in (a mapping) or put first (top-level TOML)."""
    path = tmp_path / "gpud.toml"
    if isinstance(snippet, str):
        path.write_text(snippet + to_toml(base(tmp_path)))
    else:
        path.write_text(to_toml(merge(base(tmp_path), snippet)))
    return path


def check_in_process(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["agent", "--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return code, out, err


def check_subprocess(path: Path) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "agent", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout, result.stderr


def assert_one_error_line(result: tuple[int, str, str], key: str, needles: list[str]) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("gpud: ") and "Traceback" not in err
    # The key leads the line: after the file name, or first for a host check.
    assert f": {key} " in err or f": {key}:" in err or err.startswith(f"gpud: {key}"), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(("snippet", "key", "needles"), BAD)
def test_bad_config_is_exit_2_and_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], snippet: Any, key: str, needles: list[str]
) -> None:
    path = write(tmp_path, snippet)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_error_line(check_in_process(path, capsys), key, needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a bad config changes nothing"


@pytest.mark.parametrize(
    ("snippet", "key", "needles"),
    [p for p in BAD if p.id in ("range-reversed", "admin-group-missing", "typo", "serf-missing")],
)
def test_operator_runs_check_config_on_a_bad_file(
    tmp_path: Path, snippet: Any, key: str, needles: list[str]
) -> None:
    assert_one_error_line(check_subprocess(write(tmp_path, snippet)), key, needles)


def test_good_config_prints_ok(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "node": {"interface": "lo"},
            "serf": {"retry_join": ["localhost", "gpu-02.cluster.example:7951", "[fd00::1]:7951"]},
        },
    )
    code, out, err = check_subprocess(path)
    assert (code, out) == (0, f"{path}: ok\n"), err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err


def test_missing_default_group_and_ray_are_warnings_that_say_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent runs without the default groups or ray (with less), so --check-config warns
    and still says ok; the same names set explicitly are errors (above)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    path = write(
        tmp_path,
        {"api": {"socket_group": "gpud", "admin_group": "gpud-admin"}, "ray": {"enabled": True}},
    )
    code, out, err = check_in_process(path, capsys)
    assert code == 0 and out == f"{path}: ok\n", err
    assert 'warning: ray.executable = "ray": not on PATH' in err
    for key, group in (("api.socket_group", "gpud"), ("api.admin_group", "gpud-admin")):
        if group not in {g.gr_name for g in grp.getgrall()}:
            assert f'warning: {key} = "{group}": no such group; create it: groupadd' in err


@given(
    start=st.integers(1, 65535),
    width=st.integers(1, 65535),
    low=st.integers(1, 65535),
    span=st.integers(0, 65535),
)
def test_ephemeral_overlap_is_exactly_the_intersection(
    start: int, width: int, low: int, span: int
) -> None:
    end, high = min(start + width, 65536), min(low + span, 65535)
    ports = config.PortsConfig(range_start=start, range_end=end, block_size=8)
    line = ephemeral_overlap(ports, low, high)
    # [start, end) and [low, high] are apart when one ends before the other begins.
    overlaps = not (end <= low or high < start)
    assert (line is not None) == overlaps
    if line is not None:
        key = "ports.range_start" if low <= start <= high else "ports.range_end"
        assert line.startswith(f"{key} = ") and "\n" not in line


async def test_retry_join_by_dns_name_joins_a_real_serf(tmp_path: Path) -> None:
    """serf resolves a DNS name at join: "localhost:PORT" (from /etc/hosts) reaches n1."""
    first = node_config(tmp_path, "n1")
    second = node_config(tmp_path, "n2", retry_join=[f"localhost:{first.serf.bind_port}"])
    a, b = SerfAgent(NodeContext(first, "127.0.0.1")), SerfAgent(NodeContext(second, "127.0.0.1"))
    async with running(a), running(b):
        await async_wait_for(
            lambda: a.status().members == 2 and b.status().members == 2,
            30,
            what="n2 to join n1 by the name localhost",
        )


def test_router_tls_files_are_checked_as_the_router_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config refuses what the router would refuse at its first listen, naming the key
    and the cause, and says ok for a valid pair."""
    _, cert, key = tls_files(tmp_path)
    router = {"enabled": True, "listen": "127.0.0.1", "tls_cert": cert, "tls_key": key}
    code, out, err = check_in_process(write(tmp_path, {"router": router}), capsys)
    assert code == 0 and out.endswith(": ok\n"), err
    os.chmod(key, 0o644)
    assert_one_error_line(
        check_in_process(write(tmp_path, {"router": router}), capsys),
        "router.tls_key",
        ["(mode 0644)", "chmod 0600"],
    )
    os.chmod(key, 0o600)
    other = tmp_path / "other"
    other.mkdir()
    _, other_cert, _ = tls_files(other)
    mismatched = {**router, "tls_cert": other_cert}
    assert_one_error_line(
        check_in_process(write(tmp_path, {"router": mismatched}), capsys),
        "router.tls_cert",
        ["not a PEM certificate chain and its private key"],
    )
    missing = {**router, "tls_key": str(tmp_path / "absent.key")}
    assert_one_error_line(
        check_in_process(write(tmp_path, {"router": missing}), capsys),
        "router.tls_key",
        ["cannot read", "absent.key"],
    )
