"""Beyond full mesh, which peers a node probes each step (gpud.health.prober.select_targets).

The bounded probe set must still judge every pair within a bounded number of steps, keep the
Ray head in every round, keep each node's cost and the probes it receives O(k) whatever the
cluster size, and let the peer a node sweeps probe it back in the same step.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.health.prober import (
    HEAD_WATCHERS,
    select_targets,
    sweep_order,
    sweep_steps,
    watches_head,
)

MESH_MAX = 8


def _names(n: int) -> list[str]:
    return [f"h{i:04d}" for i in range(n)]


clusters = st.integers(MESH_MAX + 1, 400).map(_names)


@given(clusters, st.integers(1, 8), st.integers(0, 10**9), st.data())
def test_every_peer_is_probed_within_sweep_steps_and_the_head_in_its_turn(
    names: list[str], k: int, first_step: int, data: st.DataObject
) -> None:
    me = data.draw(st.sampled_from(names))
    head = data.draw(st.sampled_from([None, *names]))
    watch = data.draw(st.lists(st.sampled_from(names), max_size=k, unique=True))
    peers = [n for n in names if n != me]
    ring = sorted(names)
    seen: set[str] = set()
    for step in range(first_step, first_step + sweep_steps(len(peers), k)):
        targets = select_targets(
            me,
            names,
            head=head,
            full_mesh_max=MESH_MAX,
            random_peers=k,
            step=step,
            watch=watch,
        )
        assert me not in targets and len(set(targets)) == len(targets)
        if head is not None and head != me:
            watched = watches_head(ring, ring.index(me), ring.index(head), step)
            assert watched <= (head in targets)
        assert {w for w in watch if w != me} <= set(targets)
        # Neighbours, the head, the watched peers and k others: O(k) at any size.
        assert len(targets) <= 3 + k + len(watch)
        seen.update(targets)
    assert seen == set(peers)


@given(clusters, st.integers(1, 8), st.integers(0, 10**9), st.data())
def test_probes_received_per_step_stay_bounded(
    names: list[str], k: int, step: int, data: st.DataObject
) -> None:
    """No member but the head is probed by more than a few peers per step."""
    head = data.draw(st.sampled_from([None, *names]))
    received = dict.fromkeys(names, 0)
    for me in names:
        for target in select_targets(
            me, names, head=head, full_mesh_max=MESH_MAX, random_peers=k, step=step
        ):
            received[target] += 1
    assert max(n for name, n in received.items() if name != head) <= k + 3
    # The head too: its ring neighbours and HEAD_WATCHERS others in turn, whatever the size.
    if head is not None:
        assert received[head] <= HEAD_WATCHERS + k + 3


@given(clusters, st.integers(0, 10**9), st.data())
def test_every_node_probes_the_head_within_its_turn(
    names: list[str], first_step: int, data: st.DataObject
) -> None:
    """Each node probes the head at least once every ceil((N - 1) / HEAD_WATCHERS) steps,
    and at most HEAD_WATCHERS of the others plus its two neighbours do in each step."""
    head = data.draw(st.sampled_from(names))
    ring = sorted(names)
    turn = -(-(len(ring) - 1) // HEAD_WATCHERS)
    head_at = ring.index(head)
    probed_by: set[str] = set()
    for step in range(first_step, first_step + turn):
        watchers = {
            me for at, me in enumerate(ring) if me != head and watches_head(ring, at, head_at, step)
        }
        assert len(watchers) <= HEAD_WATCHERS + 2
        probed_by |= watchers
    assert probed_by == set(ring) - {head}


@given(clusters, st.integers(1, 4).map(lambda pairs: 2 * pairs), st.integers(0, 10**9))
def test_a_swept_peer_probes_back_in_the_same_step(names: list[str], k: int, step: int) -> None:
    """With an even k (offsets come in mirror pairs) and no head, every probe a node sends in
    a step is answered by the peer's own probe of it in that step, save where the window
    wraps at an odd-length ring: in-direction evidence without dial-backs."""

    def targets(me: str) -> set[str]:
        return set(
            select_targets(me, names, head=None, full_mesh_max=MESH_MAX, random_peers=k, step=step)
        )

    chosen = {me: targets(me) for me in names}
    pairs = [(a, b) for a in names for b in chosen[a]]
    answered = sum(a in chosen[b] for a, b in pairs)
    wraps = len(sweep_order(len(names))) % 2
    assert answered >= len(pairs) - wraps * 2 * len(names)
    if not wraps:
        assert answered == len(pairs)


def test_up_to_full_mesh_max_every_peer_is_probed_every_round() -> None:
    names = _names(MESH_MAX)
    for me in names:
        assert select_targets(
            me, names, head=None, full_mesh_max=MESH_MAX, random_peers=1, step=0
        ) == sorted(set(names) - {me})


def test_sweep_order_pairs_each_offset_with_its_mirror() -> None:
    assert sweep_order(3) == []
    assert sweep_order(4) == [2]
    assert sweep_order(7) == [2, 5, 3, 4]
    assert sweep_order(8) == [2, 6, 3, 5, 4]
    assert sweep_steps(20, 3) == 6
