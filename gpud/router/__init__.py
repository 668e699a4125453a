"""The router: an OpenAI-compatible entry point on every gpud host (config ``[router]``).

A client keeps one address (any host's router) while replicas move: each router sends a
request, by its ``model``, to a ready replica of a deployment serving it, anywhere in the
cluster. No leader and no shared state: balancing uses this node's own in-flight counts and
the replicas' own queue depths, and session affinity is a rendezvous hash every router
computes alike.

- ``balance``: the pure decisions (routing table, choice of replica, the retry rule);
- ``auth``: bearer keys, stored hashed;
- ``tls``: TLS on the listener (its certificate, and the key file's mode);
- ``stats``: the router's metric families;
- ``proxy``: the aiohttp streaming proxy;
- ``service``: the component (gpud/component.py's contract).
"""
