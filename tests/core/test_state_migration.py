"""Upgrade from gpud 0.1.0: a state dir written by 0.1.0's own code (tests/fixtures/state-0.1.0,
see its README) is moved into the state store on first start, and nothing is lost."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpud import client
from gpud.errors import GpudError
from gpud.ports.blocks import ClaimRecord
from gpud.ports.leases import CLAIM, RESERVED, LeaseStore
from gpud.ray.votes import VoteRequest, VoteState, VoteStore
from gpud.state import StateStore
from tests.harness.netns import kill_process_tree
from tests.harness.serf import free_ports

FIXTURE = Path(__file__).parents[1] / "fixtures" / "state-0.1.0"

# What 0.1.0 wrote (read from the fixture with plain sqlite3, independent of gpud's code).
EXPECTED_CLAIM = ClaimRecord(
    blk=16, confirmed_at=1795468421, range_start=20000, range_end=32000, block_size=400
)
EXPECTED_LEASES = {
    "ray:n1:head": list(range(26400, 26407)),
    "model-a": [26407, 26408],
    "bench": [26409],
}


def fixture_copy(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    shutil.copytree(FIXTURE, state_dir, ignore=shutil.ignore_patterns("README.md"))
    return state_dir


def old_rows(state_dir: Path) -> list[tuple]:
    db = sqlite3.connect(state_dir / "ports.db")
    try:
        return db.execute(
            "SELECT l.id, l.owner, l.pid, l.pid_start, l.created, p.port "
            "FROM leases l JOIN lease_ports p ON p.lease_id = l.id ORDER BY p.port"
        ).fetchall()
    finally:
        db.close()


async def test_a_0_1_0_state_dir_migrates_with_every_lease_claim_range_and_vote(
    tmp_path: Path,
) -> None:
    state_dir = fixture_copy(tmp_path)
    rows = old_rows(state_dir)
    assert len(rows) == 10
    state = StateStore(state_dir)
    leases = LeaseStore(state).load()
    votes = VoteStore(state)
    # Every lease, with its id, owner, pid, start time, creation time and ports.
    got = sorted(
        (s.lease.id, s.lease.owner, s.lease.pid, s.pid_start, s.lease.created, port)
        for s in leases
        for port in s.lease.ports
    )
    assert got == sorted(rows)
    assert {s.lease.owner: s.lease.ports for s in leases} == EXPECTED_LEASES
    assert state.get(CLAIM) == EXPECTED_CLAIM
    assert state.get(RESERVED) == [(26400, 26799)]
    assert votes.state == VoteState(term=3, voted_for="n2")
    # The old files are kept aside, renamed only after the store committed them.
    assert sorted(p.name for p in state_dir.iterdir() if not p.name.startswith("gpud.db")) == [
        "ports.db.migrated",
        "ray-vote.json.migrated",
    ]
    # A voter that promised n2 in term 3 still refuses anyone else in term 3.
    reply = await votes.vote(
        VoteRequest(term=3, candidate="n3", known=3), voter="n1", own_known=3, refusal=None
    )
    assert not reply.granted
    state.close()
    # Reopened: the same, and nothing is imported twice.
    state = StateStore(state_dir)
    assert sorted(s.lease.id for s in LeaseStore(state).load()) == sorted({r[0] for r in rows})
    assert VoteStore(state).state == VoteState(term=3, voted_for="n2")
    state.close()


@pytest.mark.parametrize("crash", ["before_commit", "after_commit"])
def test_a_crash_mid_migration_migrates_again_correctly(tmp_path: Path, crash: str) -> None:
    state_dir = fixture_copy(tmp_path)
    rows = old_rows(state_dir)
    state = StateStore(state_dir)
    if crash == "before_commit":
        # The import transaction fails after writing some rows: it is rolled back.
        from gpud.ports import leases as leases_module

        def crashing(tx, path):  # type: ignore[no-untyped-def]
            leases_module._import_legacy_db(tx, path)
            raise KeyboardInterrupt

        state.ensure_table(
            "ports_leases", leases_module.LEASE_TABLES_VERSION, *leases_module.LEASE_TABLES
        )
        with pytest.raises(KeyboardInterrupt):
            state.import_file(state_dir / "ports.db", crashing)
        assert (state_dir / "ports.db").exists() and state.get(CLAIM) is None
    else:
        LeaseStore(state)
        # Killed between the commit and the rename: the old file is still there.
        (state_dir / "ports.db.migrated").rename(state_dir / "ports.db")
    state.close()
    state = StateStore(state_dir)
    leases = LeaseStore(state).load()
    assert sorted((s.lease.id, p) for s in leases for p in s.lease.ports) == sorted(
        (r[0], r[5]) for r in rows
    )
    assert state.get(CLAIM) == EXPECTED_CLAIM
    assert not (state_dir / "ports.db").exists()
    state.close()


def test_a_real_gpud_on_a_0_1_0_state_dir_comes_back_with_its_block_leases_and_vote(
    tmp_path: Path,
) -> None:
    """`gpud agent` (with its real serf child) upgraded in place: same block, same
    confirmation time in its tags, every lease served, the vote kept."""
    state_dir = fixture_copy(tmp_path)
    serf_port, rpc_port, peer_port = free_ports(3)
    sock = tmp_path / "run" / "gpud.sock"
    cfg = tmp_path / "gpud.toml"
    # The ports geometry is 0.1.0's default, under which the fixture's claim was made.
    cfg.write_text(
        f'[node]\nname = "n1"\nadvertise = "127.0.0.1"\n'
        f"[serf]\nbind_port = {serf_port}\nrpc_port = {rpc_port}\n[peer]\nport = {peer_port}\n"
        f'[paths]\nstate_dir = "{state_dir}"\nruntime_dir = "{tmp_path / "run"}"\n'
        "[ports]\nreserve = false\nsettle_s = 0.5\n[ray]\nenabled = false\n"
    )
    with open(tmp_path / "agent.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "agent", "--config", str(cfg)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            ports: dict = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ports.get("state") != "confirmed":
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
                try:
                    ports = client.request(str(sock), "GET", "/v1/ports", timeout=5)
                except (OSError, GpudError):
                    pass
                time.sleep(0.2)
            assert ports.get("state") == "confirmed", (tmp_path / "agent.log").read_text()[-3000:]
            assert ports["block"] == EXPECTED_CLAIM.blk
            assert {lease["owner"]: lease["ports"] for lease in ports["leases"]} == EXPECTED_LEASES
            status = client.request(str(sock), "GET", "/v1/status", timeout=5)
            tags = status["node"]["tags"]
            assert (tags["blk"], tags["bc"]) == (EXPECTED_CLAIM.blk, EXPECTED_CLAIM.confirmed_at)
        finally:
            kill_process_tree(proc.pid)  # gpud and its serf, which a stop leaves running
            proc.wait(10)
    state = StateStore(state_dir)
    assert VoteStore(state).state == VoteState(term=3, voted_for="n2")
    state.close()
