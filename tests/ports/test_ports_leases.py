"""Lease bookkeeping and reserved-port range arithmetic: hypothesis properties; the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.leasebook import new_lease_id
from gpud.ports import reserve
from gpud.ports.leases import Lease, LeaseStore, StoredLease, choose_ports
from gpud.state import StateStore

BLOCK = range(21200, 21232)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("lease"), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50), st.just(False)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.frozensets(st.sampled_from(list(BLOCK)), max_size=8), st.integers(0, 40))
def test_bookkeeping_never_leases_a_port_twice(
    sequence: list, foreign: frozenset[int], start: int
) -> None:
    """Random lease/release sequences against a model: no port twice, all inside the block,
    foreign-bound ports never handed out, released ports usable again."""
    used: set[int] = set()
    leases: list[list[int]] = []
    for op, arg, contiguous in sequence:
        if op == "release":
            if leases:
                used.difference_update(leases.pop(arg % len(leases)))
            continue
        free = [p for p in BLOCK if p not in used and p not in foreign]
        ports = choose_ports(BLOCK, used, arg, contiguous, lambda p: p not in foreign, start)
        if ports is None:
            if contiguous:
                # No window of `arg` consecutive usable ports exists.
                assert not any(
                    all(p in free for p in range(lo, lo + arg))
                    for lo in range(BLOCK.start, BLOCK.stop - arg + 1)
                )
            else:
                assert len(free) < arg
            continue
        assert len(ports) == arg == len(set(ports))
        assert all(p in BLOCK and p not in used and p not in foreign for p in ports)
        if contiguous:
            assert ports == list(range(ports[0], ports[0] + arg))
        used.update(ports)
        leases.append(ports)
    assert sum(len(ls) for ls in leases) == len(used)
    # Release everything: the whole usable block is available again.
    ports = choose_ports(BLOCK, set(), len(BLOCK) - len(foreign), False, lambda p: p not in foreign)
    assert ports is not None and set(ports) == set(BLOCK) - foreign


def test_count_larger_than_block_is_refused() -> None:
    assert choose_ports(BLOCK, set(), len(BLOCK) + 1, False, lambda p: True) is None
    assert choose_ports(BLOCK, set(), len(BLOCK) + 1, True, lambda p: True) is None


port_ranges = st.lists(
    st.tuples(st.integers(1, 200), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=8,
)


def _ports(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for lo, hi in ranges for p in range(lo, hi + 1)}


@given(port_ranges)
def test_ranges_roundtrip_through_sysctl_text(ranges: list[tuple[int, int]]) -> None:
    text = reserve.format_ranges(ranges)
    assert _ports(reserve.parse_ranges(text)) == _ports(ranges)
    assert reserve.parse_ranges(text) == reserve.merge(ranges)


@given(port_ranges, st.tuples(st.integers(1, 220), st.integers(0, 30)))
def test_uncovered_and_subtract(ranges: list[tuple[int, int]], want: tuple[int, int]) -> None:
    block = (want[0], want[0] + want[1])
    gaps = reserve.uncovered(ranges, block)
    assert _ports(gaps) == _ports([block]) - _ports(ranges)
    merged = reserve.merge([*ranges, *gaps])
    assert _ports([block]) <= _ports(merged)
    # Removing only what we added gives back exactly what was there before.
    assert _ports(reserve.subtract(merged, gaps)) == _ports(ranges)


def test_parse_kernel_format() -> None:
    assert reserve.parse_ranges("5000,6000-6010\n") == [(5000, 5000), (6000, 6010)]
    assert reserve.parse_ranges("\n") == []


def _lease(ports: list[int], pid: int | None = None, uid: int | None = None) -> StoredLease:
    return StoredLease(
        lease=Lease(id=new_lease_id(), owner="t", ports=ports, pid=pid, created=1.0, uid=uid),
        pid_start=7,
    )


def test_store_persists_and_refuses_duplicate_ports(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    store = LeaseStore(state)
    # The owner's uid survives a restart: only that uid (or root) may release the lease.
    first, second = _lease([21200, 21201]), _lease([21202], pid=42, uid=1234)
    store.commit([first, second], [])
    with pytest.raises(Exception, match="UNIQUE"):
        store.commit([_lease([21203]), _lease([21201])], [])
    state.close()
    state = StateStore(tmp_path)
    reopened = LeaseStore(state)
    loaded = reopened.load()
    # The failed transaction left nothing behind (21203 is not there).
    assert sorted(loaded, key=lambda s: s.lease.id) == sorted(
        [first, second], key=lambda s: s.lease.id
    )
    reopened.commit([], [first.lease.id])
    assert reopened.load() == [second]
    state.close()
