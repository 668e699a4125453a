"""Host-network verification: is the advertised address ours, how traffic reaches each peer,
and what happens to the advertised address over time (netlink address/link events).

Split by role: ``model`` (plain data), ``assess`` (pure decisions), ``netlink`` (thin I/O) and
``service`` (the component). The names other packages use are re-exported here.
"""

from gpud.netcheck.assess import (
    assess,
    choose_advertise,
    effective_mtu,
    initial_state,
    interface_holding,
    not_local_reason,
    reconcile,
)
from gpud.netcheck.model import (
    AddressInfo,
    AdvertiseState,
    DefaultRoute,
    HostNetwork,
    LinkInfo,
    NetworkStatus,
    RouteInfo,
)
from gpud.netcheck.netlink import (
    check_now,
    interface_for,
    read_host_network,
    read_routes,
    resolve_advertise,
)
from gpud.netcheck.service import NetCheck

__all__ = [
    "AddressInfo",
    "AdvertiseState",
    "DefaultRoute",
    "HostNetwork",
    "LinkInfo",
    "NetCheck",
    "NetworkStatus",
    "RouteInfo",
    "assess",
    "check_now",
    "choose_advertise",
    "effective_mtu",
    "initial_state",
    "interface_for",
    "interface_holding",
    "not_local_reason",
    "read_host_network",
    "read_routes",
    "reconcile",
    "resolve_advertise",
]
