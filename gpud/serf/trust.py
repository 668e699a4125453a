"""The serf component's trust problems, as a pure function of what it saw.

Gossip is only as private as the cluster key: these are the problems of an unkeyed cluster
without consent, of a cluster key file readable beyond root and the service, and of gossip
serf could not decrypt (its output lines, gathered by gpud.serf.agent). Who is the odd one
out for undecryptable gossip depends on whether this node sees any other member alive.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from gpud.component import Problem
from gpud.config import UNENCRYPTED, Config
from gpud.context import Member


def trust_problems(
    config: Config,
    key_warnings: list[str],
    undecryptable: Collection[str],
    me: str,
    members: Mapping[str, Member],
) -> list[Problem]:
    """An unkeyed cluster without consent, the cluster key file's ``key_warnings``, and
    gossip from the addresses ``undecryptable`` (recently) that cannot be decrypted: this
    node (``me``) is the odd one (critical) when it sees no other member alive, else the
    sender is (pure)."""
    found: list[Problem] = []
    if not config.cluster.key_file and not config.cluster.insecure:
        found.append(
            Problem(
                code="serf.unencrypted",
                severity="critical",
                subject="cluster",
                message=UNENCRYPTED,
                fix="make a key with `gpud keygen`, install it 0600 for the service user "
                "on every host and set cluster.key_file; for a test cluster set "
                "cluster.insecure = true",
            )
        )
    found += [
        Problem(
            code="config.key_file_mode",
            severity="warning",
            subject="cluster.key_file",
            message=warning,
            fix=f"chown gpud:gpud {config.cluster.key_file} && chmod 0600 "
            f"{config.cluster.key_file}",
        )
        for warning in key_warnings
    ]
    if not undecryptable:
        return found
    alone = not any(m.status == "alive" for n, m in members.items() if n != me)
    if alone:
        addrs = ", ".join(sorted(undecryptable))
        found.append(
            Problem(
                code="serf.key_mismatch",
                severity="critical",
                subject=me,
                message=f"cannot join {addrs}: its gossip cannot be decrypted; cluster.key differs",
                fix="put the cluster's key (cluster.key_file of a working node) in this "
                "host's cluster.key_file and restart gpud",
            )
        )
        return found
    found += [
        Problem(
            code="serf.undecryptable_gossip",
            severity="warning",
            subject=addr,
            message=f"a host at {addr} sends gossip we cannot decrypt",
            fix=f"give the host at {addr} this cluster's key (its cluster.key_file "
            "differs), or find out who runs it if it is not yours",
        )
        for addr in sorted(undecryptable)
    ]
    return found
