"""The deployments component in-process: operator signatures, the stored record set (durable
across a restart, Lamport clock included), the API's refusals (bad spec, no majority), and
the pure helpers it gossips with (claims tag, majority rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.deployments import authority, spec, version
from gpud.deployments.claims import Claim, parse_claims
from gpud.deployments.model import DeleteRequest, Entry
from gpud.deployments.placement import may_roll
from gpud.deployments.records import majority_refusal
from gpud.deployments.store import set_digest
from gpud.errors import ApiError
from gpud.state import StateStore
from tests.harness.deployments import deployment_service

SPEC = b"""
name = "echo"
engine = "command"
replicas = 2
gpus_per_node = 1
command = ["/usr/bin/srv", "--port", "{port}"]
"""


# ---- authority -----------------------------------------------------------------------------


def test_signature_verifies_only_for_that_spec_and_a_trusted_key() -> None:
    private, public = authority.keygen()
    s = spec.load_spec(SPEC)
    operator, signature = authority.sign(s, authority.load_private(private))
    assert operator == public
    assert authority.refusal(s, operator, signature, [public]) == ""
    assert "not signed" in authority.refusal(s, "", "", [public])
    assert "not in this host" in authority.refusal(s, operator, signature, [])
    other = spec.load_spec(SPEC.replace(b"replicas = 2", b"replicas = 3"))
    assert "does not verify" in authority.refusal(other, operator, signature, [public])
    assert "does not verify" in authority.refusal(s, operator, "AAAA", [public])


def test_private_key_file_is_the_key_or_keygen_output() -> None:
    private, public = authority.keygen()
    text = f"private {private}\npublic  {public}\n# comment line\n"
    assert authority.public_of(authority.load_private(text)) == public
    assert authority.public_of(authority.load_private(private + "\n")) == public
    with pytest.raises(authority.AuthorityError):
        authority.load_private("private not-base64!\n")


# ---- pure helpers --------------------------------------------------------------------------


@given(st.integers(1, 8), st.data())
def test_rolling_update_takes_down_one_replica_at_a_time(
    replicas: int, data: st.DataObject
) -> None:
    """Every node decides for its own replica with `may_roll`, all in the same instant (the
    worst case); replicas on the new spec get ready in any order. Never more than one replica
    is down, and the roll finishes."""
    state = {i: ("old", True) for i in range(replicas)}  # index -> (spec, ready)
    for _ in range(4 * replicas):
        rolling = [
            i
            for i, (spec_, _) in state.items()
            if spec_ == "old" and may_roll(i, {j: v for j, v in state.items() if j != i}, "new")
        ]
        for i in rolling:
            state[i] = ("new", False)
        assert sum(not ready for _, ready in state.values()) <= 1, state
        starting = [i for i, (_, ready) in state.items() if not ready]
        if starting and data.draw(st.booleans()):
            state[starting[0]] = ("new", True)
        if all(v == ("new", True) for v in state.values()):
            return
    # Readiness may have been withheld by the draws; once granted, the roll completes.
    for _ in range(replicas + 1):
        for i, (spec_, _) in state.items():
            if spec_ == "old" and may_roll(i, {j: v for j, v in state.items() if j != i}, "new"):
                state[i] = ("new", False)
        assert sum(not ready for _, ready in state.values()) <= 1, state
        state = {
            i: ("new", True) if spec_ == "new" else (spec_, r) for i, (spec_, r) in state.items()
        }
    assert all(v == ("new", True) for v in state.values()), state


@given(st.lists(st.sampled_from(["alive", "failed", "leaving", "left"]), max_size=12))
def test_apply_needs_a_strict_majority_of_known_members(statuses: list[str]) -> None:
    members = [Member(name=f"m{i}", addr="10.0.0.1", port=1, status=s) for i, s in
               enumerate(statuses)]  # fmt: skip
    known = 1 + sum(s != "left" for s in statuses)  # this node counts as alive and known
    alive = 1 + statuses.count("alive")
    assert (majority_refusal(members, "self") == "") == (alive * 2 > known)


# ---- the component ---------------------------------------------------------------------------


async def test_apply_delete_persist_and_refuse(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store)
    with pytest.raises(ApiError) as bad:
        await svc.records.apply(SPEC.replace(b"replicas = 2", b"replicas = -1"))
    assert bad.value.status == 400 and "replicas" in bad.value.message
    assert svc.listing().deployments == [] and svc.status().lamport == 0

    first = await svc.records.apply(SPEC)
    again = await svc.records.apply(SPEC)
    assert first.changed and not again.changed and again.version == first.version
    view = svc.view("echo")
    assert view.state == "refused" and "not signed" in view.reason

    # No majority: 1 of 3 known members alive -> 409, nothing changes.
    svc.ctx.members.update(
        {n: Member(name=n, addr="10.0.0.9", port=1, status="failed") for n in ("n2", "n3")}
    )
    with pytest.raises(ApiError) as refused:
        await svc.records.delete("echo")
    assert refused.value.status == 409 and "majority" in refused.value.message
    del svc.ctx.members["n2"], svc.ctx.members["n3"]

    deleted = await svc.records.delete("echo")
    store.close()

    # A restart keeps the tombstone and the clock: the next apply orders after the delete.
    store = StateStore(tmp_path / "state")
    restarted = deployment_service(tmp_path, store)
    assert restarted.listing().deleted == ["echo"]
    assert restarted.status().digest == set_digest(restarted.records.entries) != ""
    reapplied = await restarted.records.apply(SPEC)
    assert int(reapplied.version.split("@")[0]) > int(deleted.version.split("@")[0])
    store.close()


async def test_signed_spec_runs_only_with_allowed_command(tmp_path: Path) -> None:
    private, public = authority.keygen()
    key = authority.load_private(private)
    s = spec.load_spec(SPEC)
    operator, signature = authority.sign(s, key)
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store, operators=[public], command_allow=["/usr/bin/srv"])
    with pytest.raises(ApiError) as forged:
        await svc.records.apply(SPEC.replace(b"replicas = 2", b"replicas = 3"), operator, signature)
    assert forged.value.status == 400
    await svc.records.apply(SPEC, operator, signature)
    assert svc.view("echo").state == "active"
    store.close()

    store = StateStore(tmp_path / "state")
    elsewhere = deployment_service(
        tmp_path, store, operators=[public], command_allow=["/usr/bin/other"]
    )
    view = elsewhere.view("echo")
    assert view.state == "refused" and "command_allow" in view.reason
    assert [p.code for p in elsewhere.problems()] == ["deployments.refused"]
    store.close()


async def test_peer_records_get_the_checks_of_an_apply(tmp_path: Path) -> None:
    """A record from a peer is held to the spec's own checks (here: an env var gpud sets
    itself) and to the record's consistency; refused ones change nothing."""
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store)
    good = spec.load_spec(SPEC)
    sneaky = msgspec.structs.replace(good, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    forged_digest = msgspec.structs.replace(
        version.applied(good, version.SpecVersion(7, "peer")), digest="0" * 32
    )
    taken = await svc.records.merge(
        [
            Entry(record=version.applied(sneaky, version.SpecVersion(5, "peer"))),
            Entry(record=forged_digest),
        ]
    )
    assert taken == [] and svc.listing().deployments == [] and svc.status().digest == ""
    assert await svc.records.merge(
        [Entry(record=version.applied(good, version.SpecVersion(9, "p")))]
    )
    assert svc.status().lamport == 9
    store.close()


async def test_claims_that_do_not_fit_in_the_tags_are_left_out_heads_first_kept(
    tmp_path: Path,
) -> None:
    """Memberlist allows 512 bytes for all of a node's tags: the claims that do not fit are
    left out with a warning and a problem (the heads' kept), and the tag update still goes
    through."""
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store)
    claims = {(f"deployment-{i:02}", 0): Claim(20001 + i, "ab12", 0, True) for i in range(30)}
    claims[("zz-head", 1)] = Claim(20100, "ab12", 20101, True)
    svc._own_claims = lambda: claims  # type: ignore[method-assign]
    await svc._publish()
    announced = parse_claims(svc.ctx.tags.dp)
    assert announced and len(announced) < len(claims)
    assert announced[("zz-head", 1)] == claims[("zz-head", 1)]
    assert all(claims[k] == c for k, c in announced.items())
    assert svc.ctx.tags.dv == svc.status().digest
    problem = next(p for p in svc.problems() if p.code == "deployments.claims_truncated")
    assert "deployment-29.0" in problem.message and "zz-head" not in problem.message
    store.close()


def test_delete_signature_covers_the_name_and_the_version() -> None:
    private, public = authority.keygen()
    key = authority.load_private(private)
    v = version.SpecVersion(7, "n1")
    operator, signature = authority.sign_delete("echo", v, key)
    assert authority.delete_refusal("echo", v, operator, signature, [public]) == ""
    assert "not signed" in authority.delete_refusal("echo", v, "", "", [public])
    assert "not in this host" in authority.delete_refusal("echo", v, operator, signature, [])
    for name, other in (("other", v), ("echo", version.SpecVersion(8, "n1"))):
        assert "does not verify" in authority.delete_refusal(
            name, other, operator, signature, [public]
        )
    # A spec's signature is no delete's, and the other way round.
    s = spec.load_spec(SPEC)
    assert "does not verify" in authority.refusal(s, operator, signature, [public])


async def test_deletes_need_an_operator_signature_where_operators_are_set(
    tmp_path: Path,
) -> None:
    private, public = authority.keygen()
    key = authority.load_private(private)
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store, operators=[public], command_allow=["/usr/bin/srv"])
    await svc.records.apply(SPEC, *authority.sign(spec.load_spec(SPEC), key))
    before = svc.status().digest

    # Unsigned, signed by an untrusted key, or signed for another version: 4xx, nothing changes.
    tomb = version.SpecVersion(svc.status().lamport + 1, "n1")
    stranger = authority.load_private(authority.keygen()[0])
    for signed, status, words in (
        (None, 403, "--key"),
        (DeleteRequest(version=tomb, **_signed("echo", tomb, stranger)), 403, "not in this host"),
        (
            DeleteRequest(
                version=version.SpecVersion(tomb.lamport + 1, "n1"), **_signed("echo", tomb, key)
            ),
            400,
            "does not verify",
        ),
        (
            DeleteRequest(
                version=version.SpecVersion(1, "n1"),
                **_signed("echo", version.SpecVersion(1, "n1"), key),
            ),
            409,
            "run the delete again",
        ),
    ):
        with pytest.raises(ApiError) as refused:
            await svc.records.delete("echo", signed)
        assert refused.value.status == status and words in refused.value.message
        assert svc.status().digest == before and svc.view("echo").state == "active"

    # A peer's tombstone without a valid signature is not merged; the reason shows.
    forged = Entry(record=version.deleted("echo", version.SpecVersion(99, "peer")))
    assert await svc.records.merge([forged]) == []
    view = svc.view("echo")
    assert view.state == "active" and "not signed" in view.delete_refused

    reply = await svc.records.delete(
        "echo", DeleteRequest(version=tomb, **_signed("echo", tomb, key))
    )
    assert reply.changed and svc.listing().deleted == ["echo"]
    store.close()


def _signed(name: str, v: version.SpecVersion, key: Ed25519PrivateKey) -> dict[str, str]:
    operator, signature = authority.sign_delete(name, v, key)
    return {"operator": operator, "signature": signature}


_KEYS = [authority.load_private(authority.keygen()[0]) for _ in range(2)]


@given(
    st.integers(1, 4),
    st.integers(0, 1),
    st.lists(st.integers(0, 1), max_size=2, unique=True),
    st.booleans(),
)
def test_a_verified_signature_is_judged_like_one_checked_again(
    replicas: int, signer: int, trusted: list[int], delete: bool
) -> None:
    """The apply and delete paths check a signature once and then judge only trust
    (``verified=True``): for every signature that verifies, the verdict is the same as a
    full check's."""
    s = spec.load_spec(SPEC.replace(b"replicas = 2", f"replicas = {replicas}".encode()))
    v = version.SpecVersion(replicas, "n1")
    key = _KEYS[signer]
    keys = [authority.public_of(_KEYS[i]) for i in trusted]
    if delete:
        operator, signature = authority.sign_delete(s.name, v, key)
        assert authority.delete_signature_refusal(s.name, v, operator, signature) == ""
        full = authority.delete_refusal(s.name, v, operator, signature, keys)
        once = authority.delete_refusal(s.name, v, operator, signature, keys, verified=True)
    else:
        operator, signature = authority.sign(s, key)
        assert authority.signature_refusal(s, operator, signature) == ""
        full = authority.refusal(s, operator, signature, keys)
        once = authority.refusal(s, operator, signature, keys, verified=True)
    assert once == full and (full == "") == (operator in keys)


async def test_apply_decodes_the_spec_once_and_checks_its_signature_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = authority.keygen()
    operator, signature = authority.sign(spec.load_spec(SPEC), authority.load_private(private))
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store, operators=[public], command_allow=["/usr/bin/srv"])
    calls: dict[str, int] = {"load_spec": 0, "decode": 0, "signature": 0}

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(spec, "load_spec", counted("load_spec", spec.load_spec))
    monkeypatch.setattr(spec, "decode", counted("decode", spec.decode))
    monkeypatch.setattr(authority, "_bad_signature", counted("signature", authority._bad_signature))
    await svc.records.apply(SPEC, operator, signature)
    assert svc.view("echo").state == "active" and svc.problems() == []
    assert calls == {"load_spec": 1, "decode": 0, "signature": 1}
    # A forged signature is still refused, and nothing changes.
    with pytest.raises(ApiError) as forged:
        await svc.records.apply(SPEC.replace(b"replicas = 2", b"replicas = 3"), operator, signature)
    assert forged.value.status == 400 and svc.view("echo").replicas == 2
    store.close()
