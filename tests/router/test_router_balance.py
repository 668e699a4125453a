"""The router's pure decisions, as production runs them: routing table, replica choice,
session affinity, the retry rule, queue depths, API keys and request bodies."""

from __future__ import annotations

import random
import stat

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.router import listing_of
from gpud.deployments.model import DeploymentsList, ReplicaView
from gpud.errors import ConfigError
from gpud.router import auth, balance, tls
from gpud.router.proxy import RouterError, requested_model

urls = st.lists(
    st.integers(1, 65535).map(lambda p: f"http://10.0.0.1:{p}"),
    min_size=1,
    max_size=12,
    unique=True,
)
sessions = st.lists(st.text(min_size=1, max_size=16), min_size=1, max_size=40, unique=True)


@settings(max_examples=300, deadline=None)
@given(urls, sessions, st.data())
def test_rendezvous_removing_a_replica_moves_only_its_sessions(replicas, ids, data):
    before = {s: balance.affinity(s, replicas) for s in ids}
    if len(replicas) == 1:
        return
    gone = data.draw(st.sampled_from(replicas))
    left = [u for u in replicas if u != gone]
    data.draw(st.randoms()).shuffle(left)  # order of the ready list does not matter
    for s in ids:
        after = balance.affinity(s, left)
        if before[s] != gone:
            assert after == before[s]
        else:
            assert after in left


@settings(max_examples=300, deadline=None)
@given(urls, st.data())
def test_adding_a_replica_takes_sessions_only_onto_itself(replicas, data):
    new = "http://10.0.0.2:1"
    for s in data.draw(sessions):
        after = balance.affinity(s, [*replicas, new])
        assert after in (balance.affinity(s, replicas), new)


@settings(max_examples=300, deadline=None)
@given(
    urls,
    st.text(max_size=8),
    st.dictionaries(st.integers(1, 65535), st.integers(0, 50)),
    st.data(),
)
def test_choose_never_repeats_a_replica_and_never_picks_the_most_loaded(
    replicas, session, loads, data
):
    load = {u: loads.get(i, 0) for i, u in enumerate(replicas)}
    tried = frozenset(data.draw(st.lists(st.sampled_from(replicas), unique=True)))
    rng = random.Random(data.draw(st.integers()))
    got = balance.choose(replicas, session=session, load=load.__getitem__, tried=tried, rng=rng)
    left = [u for u in replicas if u not in tried]
    if not left:
        assert got is None
        return
    assert got in left
    if session:
        assert got == balance.affinity(session, left)
    elif len(left) > 1:
        top = max(load[u] for u in left)
        if sum(load[u] == top for u in left) == 1:
            assert load[got] < top  # two choices never take the single most loaded one


def test_two_choices_spread_evenly_without_load():
    rng = random.Random(7)
    picks = [balance.two_choices(["a", "b"], lambda _: 0.0, rng) for _ in range(4000)]
    assert abs(picks.count("a") - 2000) < 200


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["connect_failed", "not_written", "draining", "failed_after_write", "answered"]
        )
    ),
    st.integers(1, 8),
)
def test_retries_are_bounded_and_stop_at_the_first_delivered_attempt(outcomes, max_attempts):
    """Drive the rule as the proxy does: attempt, then ask whether another may follow."""
    attempts = 0
    for outcome in outcomes:
        attempts += 1
        if not balance.may_retry(outcome, attempts, max_attempts):
            break
    assert attempts <= max(1, max_attempts) or not outcomes
    delivered = [i for i, o in enumerate(outcomes) if o in ("failed_after_write", "answered")]
    if delivered:
        assert attempts <= delivered[0] + 1  # nothing after a request may have reached one


@given(
    st.booleans(),
    st.booleans(),
    st.none() | st.integers(100, 599),
    st.integers(0, 8),
    st.integers(1, 8),
)
def test_a_retry_follows_only_an_attempt_that_provably_reached_no_engine(
    connected, written, status, attempts, max_attempts
):
    """An attempt may be retried only if no connection was made, or one was but not a byte of
    the request went out on it, or the replica refused with 503: never once a request byte was
    written and no answer came (the engine may be generating), never past the bound."""
    ended = balance.attempt_outcome(connected=connected, written=written, status=status)
    retry = balance.may_retry(ended, attempts, max_attempts)
    if status is None and written and connected:
        assert ended == "failed_after_write" and not retry
    if status is not None and status != 503:
        assert ended == "answered" and not retry
    if retry:
        assert attempts < max_attempts
        assert status == 503 or (status is None and not (connected and written))
    elif attempts < max_attempts:
        assert ended in ("failed_after_write", "answered")


@given(st.lists(st.tuples(st.text("ab", max_size=3), st.floats(0, 1e6)), max_size=6))
def test_queue_depth_sums_the_waiting_gauge_and_ignores_others(series):
    lines = ["# HELP vllm:num_requests_waiting x", "vllm:num_requests_waiting_total 99"]
    lines += [f'vllm:num_requests_waiting{{model_name="{m}"}} {v!r}' for m, v in series]
    lines.append("vllm:num_requests_running 5")
    got = balance.queue_depth("\n".join(lines))
    if not series:
        assert got is None
    else:
        assert got == pytest.approx(sum(v for _, v in series))
    assert balance.queue_depth("garbage\n{}{") is None


def test_table_lists_only_ready_replicas_and_answers_to_model_and_name():
    listing = listing_of({"a": 1001, "b": 1002}, model="m", name="dep")
    views = listing.deployments[0].replica_views
    views[1] = msgspec.structs.replace(views[1], state="starting")
    pending = msgspec.structs.replace(listing.deployments[0], name="idle", model="other")
    pending.replica_views = [ReplicaView(index=0, state="pending")]
    table = balance.table(
        DeploymentsList(
            node="x", digest="", lamport=0, deployments=[listing.deployments[0], pending]
        )
    )
    assert [u.url for u in table.ready["m"]] == ["http://127.0.0.1:1001"]
    assert table.ready["dep"] == table.ready["m"]
    assert "other" in table.known and "other" not in table.ready
    assert balance.models(listing) == ["m"]


@given(st.lists(st.sampled_from(["a", "b", "c"]), unique=True), st.floats(0, 10))
def test_shunned_replicas_are_skipped_unless_all_are(shunned, now):
    until = {u: now + 1 for u in shunned}
    got = balance.usable(["a", "b", "c"], until, now)
    assert got == ([u for u in "abc" if u not in shunned] or ["a", "b", "c"])


@given(st.integers(0, 0o777))
def test_keys_file_refused_when_others_may_write_it(mode):
    refused = auth.mode_refusal("/k", stat.S_IFREG | mode)
    assert (refused is not None) == bool(mode & 0o022)
    assert (auth.mode_warning("/k", mode) is not None) == bool(mode & 0o004)


def test_keys_file_holds_hashes_and_names_a_bad_line():
    digest = auth.hash_key("secret")
    assert auth.parse_keys(f"# ops\n\nsha256:{digest} alice\n", source="f") == {digest}
    with pytest.raises(ConfigError, match="f:2: not `sha256"):
        auth.parse_keys(f"sha256:{digest}\nsecret\n", source="f")


@given(st.binary(max_size=64))
def test_any_body_gives_a_model_or_an_openai_400(raw):
    try:
        model = requested_model(raw)
    except RouterError as exc:
        assert exc.status == 400 and exc.code in ("invalid_json", "invalid_request")
    else:
        assert isinstance(model, str) and model


@given(st.text(min_size=1, max_size=20), st.dictionaries(st.text(max_size=5), st.integers()))
def test_model_comes_from_a_json_object(model, extra):
    raw = msgspec.json.encode({**{k: v for k, v in extra.items() if k != "model"}, "model": model})
    assert requested_model(raw) == model


@given(st.integers(0, 0o777))
def test_a_tls_key_others_may_read_or_group_may_write_is_refused(mode):
    refusal = tls.key_mode_refusal("/k", mode)
    assert (refusal is None) == (not mode & 0o026)  # others read or write, group write
    if refusal:
        assert f"{mode:04o}" in refusal and "chmod 0600" in refusal


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"port": 20001}, "router.port: 20001 lies in the ports range 20000-32000"),
        ({"port": 7948}, "router.port: 7948 is already peer.port"),
        ({"port": 7949}, "router.port: 7949 is already the port of metrics.listen"),
        ({"listen": "localhost"}, "router.listen: 'localhost' is not an IP address"),
        ({"tls_cert": "/etc/gpud/router.pem"}, "router.tls_cert and router.tls_key: set both"),
    ],
)
def test_router_config_refuses_ports_it_would_fight_over(router, message):
    from gpud.config import parse

    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in router.items())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse(f"[router]\nenabled = true\n{lines}")
    parse(f"[router]\nenabled = false\n{lines}")  # off: nothing to fight over
    assert parse("[router]\nenabled = true\n").router.port == 7950
