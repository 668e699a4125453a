"""The host port space: per-node block claims and the local lease allocator.

- ``blocks``: pure block-claim decision (rendezvous hash + deterministic conflict rule).
- ``leases``: lease schemas, pure port choice, the SQLite lease store, owner liveness.
- ``reserve``: merge the block into net.ipv4.ip_local_reserved_ports (this netns only).
- ``service``: ``PortsService(ctx)``, the component (claim loop, zombie scan, API routes).
- ``cli``: ``gpud ports``, ``gpud ports lease``, ``gpud ports release``.
"""
