"""What every component of a running agent shares: config, identity, membership, own tags.

Components implement ``gpud.component.Component``; the agent module wires them together and
runs them in one TaskGroup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gpud import log
from gpud.tags import Tags, encode

if TYPE_CHECKING:
    # Type-only: the CLI decodes Member without loading the config module.
    from gpud.config import Config

_log = log.get("context")

MemberStatus = Literal["alive", "leaving", "left", "failed", "none"]


class Member(msgspec.Struct, kw_only=True):
    """One cluster member as this node currently sees it."""

    name: str
    addr: str
    # Serf gossip port.
    port: int
    status: MemberStatus
    # Decoded gpud tags, or None with the reason in tags_error.
    tags: Tags | None = None
    tags_error: str | None = None
    # This node's own data-path verdict (gpud.health): the member stopped answering and quick
    # re-probes confirmed it, usually seconds before Serf marks it failed. ``status`` stays
    # Serf's own; ``alive`` (what the election counts) is false while down.
    down: bool = False
    down_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.status == "alive" and not self.down


def with_down(members: dict[str, Member], down: dict[str, str]) -> dict[str, Member]:
    """``members`` with the health component's down verdicts (name -> reason) applied."""
    return {
        name: msgspec.structs.replace(m, down=name in down, down_reason=down.get(name))
        if m.down != (name in down) or m.down_reason != down.get(name)
        else m
        for name, m in members.items()
    }


class NodeContext:
    """Shared state of one agent. Mutated only by the agent's own components."""

    def __init__(self, config: Config, advertise_addr: str) -> None:
        self.config = config
        self.node_name = config.node_name
        self.advertise_addr = advertise_addr
        # False behind NAT / port mapping: the address is not on any local interface.
        self.advertise_is_local = True
        self.tags = Tags(pp=config.peer.port, rh=config.ray.head, pri=config.ray.priority)
        self.members: dict[str, Member] = {}
        # Members the health component judges down (name -> reason); applied to every view.
        self.down: dict[str, str] = {}
        # Set by the agent: pushes self.tags to Serf.
        self._publish_tags: Callable[[Tags], Awaitable[None]] | None = None
        # Callbacks run (synchronously) after every membership change.
        self._member_listeners: list[Callable[[dict[str, Member]], None]] = []

    async def update_tags(self, **fields: Any) -> None:
        """Change some of this node's tags and gossip them.

        Raises TagsError if they would not fit in memberlist's limit (nothing changes then).
        If serf is unreachable the new tags are kept: serf gets them again on reconnect.
        """
        new = msgspec.structs.replace(self.tags, **fields)
        if new == self.tags:
            return
        encode(new)
        self.tags = new
        if self._publish_tags is None:
            return
        try:
            await self._publish_tags(new)
        except Exception as exc:
            log.warning(_log, "tags not gossiped yet; serf gets them on reconnect", error=str(exc))

    def set_tag_publisher(self, publish: Callable[[Tags], Awaitable[None]]) -> None:
        self._publish_tags = publish

    def on_members_changed(self, listener: Callable[[dict[str, Member]], None]) -> None:
        self._member_listeners.append(listener)

    def set_members(self, members: dict[str, Member]) -> None:
        self.members = with_down(members, self.down)
        for listener in self._member_listeners:
            listener(members)

    def set_down(self, down: dict[str, str]) -> None:
        """The health component's down verdicts changed: re-apply them and notify listeners."""
        if down != self.down:
            self.down = dict(down)
            self.set_members(self.members)

    def peers(self) -> list[Member]:
        """Alive members other than this node."""
        return [m for m in self.members.values() if m.alive and m.name != self.node_name]
