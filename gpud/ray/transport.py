"""How the election's queries travel: the slice of gpud.serf.agent it needs (the tests' loopback
transport implements it too)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from gpud.serf.agent import QueryHandler


class QueryTransport(Protocol):
    """What the election sends its queries over and answers them on."""

    async def query(
        self,
        name: str,
        payload: bytes,
        *,
        timeout_s: float | None = None,
        enough: Callable[[Mapping[str, bytes]], bool] | None = None,
    ) -> dict[str, bytes]: ...

    def on_query(self, name: str, handler: QueryHandler) -> None: ...
