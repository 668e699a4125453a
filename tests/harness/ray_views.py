"""What the Ray election and problem tests feed the pure functions: hypothesis strategies of
membership views (any names, statuses and tags, malformed ones included) and a RayStatus with
defaults to override."""

from __future__ import annotations

from hypothesis import strategies as st

from gpud.context import Member
from gpud.ray.problems import RayNodesSeen, RayStatus
from gpud.ray.supervisor import RayProcessStatus
from gpud.tags import Tags

NAMES = [f"n{i}" for i in range(7)]

tags_strategy = st.builds(
    Tags,
    ray=st.sampled_from(["none", "head", "worker"]),
    term=st.integers(0, 5),
    rh=st.sampled_from(["auto", "prefer", "never"]),
    pri=st.integers(-2, 2),
    rv=st.booleans(),
    nat=st.booleans(),
    hl=st.sampled_from(["unknown", "passing", "warning", "critical"]),
)


@st.composite
def views(draw: st.DrawFn) -> dict[str, Member]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True))
    members = {}
    for name in names:
        members[name] = Member(
            name=name,
            addr="10.77.0.1",
            port=7946,
            status=draw(st.sampled_from(["alive", "alive", "alive", "failed", "left"])),
            tags=draw(st.one_of(tags_strategy, st.none())),
            tags_error=None,
        )
    return members


def with_self_alive(members: dict[str, Member], me: str) -> dict[str, Member]:
    """The view as ``me`` sees it: a node always sees itself alive, with tags."""
    own = members[me]
    members = dict(members)
    members[me] = Member(
        name=me, addr=own.addr, port=own.port, status="alive", tags=own.tags or Tags()
    )
    return members


def ray_status(**over: object) -> RayStatus:
    """An enabled follower's RayStatus (head "h"), with ``over`` replacing fields."""
    base: dict[str, object] = {
        "enabled": True,
        "role": "none",
        "term": 1,
        "action": "follow",
        "head": "h",
        "eligible": True,
        "ray_available": True,
        "process": RayProcessStatus(),
        "ray_nodes": RayNodesSeen(),
        "summary": "",
    }
    return RayStatus(**(base | over))  # type: ignore[arg-type]
