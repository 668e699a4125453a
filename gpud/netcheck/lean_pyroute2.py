"""The few pyroute2 names gpud uses, imported without running pyroute2's package ``__init__``.

That ``__init__`` imports every pyroute2 API at once (IPDB, NDB with its SQLite schema,
WireGuard, nl80211, IPVS, plan9, ...): about 60 modules and 4 MiB of every agent's RSS that
netcheck never touches (bench.idle). So the package is registered without executing it, and
only the submodules below load. Whoever later asks the package itself for a name (``from
pyroute2 import IPRoute`` in a test, or inside pyroute2) gets the whole ``__init__`` run then,
once, into the same module: nothing else in the process sees a difference.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def _register_unexecuted(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the imports below raise the usual error
    package = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str) -> Any:
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")  # a submodule, not __init__'s
        # A name only the package's __init__ defines: run it now, once, into this module.
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        try:
            return package.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = package


_register_unexecuted("pyroute2")

from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.rtnl import (  # noqa: E402
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

__all__ = [
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV6_IFADDR",
    "RTMGRP_LINK",
    "AsyncIPRoute",
    "NetlinkError",
]
