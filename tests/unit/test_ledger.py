"""The replicas' ledger applies the global aggregator's rule to the partials topic's order: the
first group naming an agent counts, a later one naming it again is void."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from regional_aggregator.ledger import Ledger
from regional_aggregator.service import adopter_of, parse_status

AGENTS = [f"agent-{i}" for i in range(6)]


def test_first_group_wins_and_coverage():
    led = Ledger("region-0")
    assert led.add(1, "a/0", 0, ["agent-0", "agent-1"])
    assert not led.add(1, "b/0", 0, ["agent-1", "agent-2"])  # agent-1 counted first by a
    assert led.is_void(1, "b/0", 0) and not led.is_void(1, "a/0", 0)
    assert led.add(1, "b/1", 0, ["agent-2", "agent-3"], declined=["agent-4"])
    assert led.counted(1) == {"agent-0", "agent-1", "agent-2", "agent-3"}
    assert led.covered(1) == led.counted(1) | {"agent-4"}
    assert led.next_batch(1, "b") == 2 and led.next_batch(1, "a") == 1
    assert led.next_batch(1, "c") == 0 and not led.complete(1)
    assert led.add(1, "a/1", 0, [], complete=True) and led.complete(1)
    # a later chunk of a group already seen changes nothing
    assert not led.add(1, "b/0", 0, ["agent-1", "agent-2"])
    assert led.counted(2) == set()  # rounds are separate
    led.forget_before(2)
    assert led.counted(1) == set()


groups = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3),
                            st.integers(0, 2), st.sets(st.sampled_from(AGENTS), min_size=1)),
                  max_size=20)


@given(groups)
def test_ledger_matches_first_wins_reference(seq):
    """Against an independent reference: scan in order, a group counts iff it is the first
    sighting of its key and none of its agents was counted before."""
    led = Ledger("region-0")
    owner: dict[str, tuple] = {}
    decided: dict[tuple, bool] = {}
    for replica, seq_no, group, agents in seq:
        batch, key = f"{replica}/{seq_no}", (f"{replica}/{seq_no}", group)
        got = led.add(7, batch, group, sorted(agents))
        if key not in decided:
            decided[key] = not any(a in owner for a in agents)
            if decided[key]:
                owner.update(dict.fromkeys(agents, key))
        assert got == decided[key]
    assert led.counted(7) == set(owner)
    for (batch, group), counts in decided.items():
        assert led.is_void(7, batch, group) == (not counts)


@given(st.text(max_size=40), st.binary(max_size=80))
def test_replica_status_parses_only_what_a_replica_sends(replica, payload):
    got = parse_status(replica, payload)
    if got is not None:
        assert got in ("up", "down") or got.startswith("adopted:")
        assert payload.decode() == got


def test_replica_status_examples():
    assert parse_status("a", b"up") == "up" and parse_status("b-2", b"down") == "down"
    assert parse_status("a", b"adopted:b") == "adopted:b"
    assert parse_status("a", b"adopted:") is None and parse_status("a/b", b"up") is None
    assert parse_status("a", b"UP") is None and parse_status("", b"up") is None


@given(st.dictionaries(st.sampled_from(list("abcdef")),
                       st.sampled_from(["up", "down", "adopted:a"]), max_size=6),
       st.sampled_from(list("abcdef")))
def test_every_replica_picks_the_same_single_adopter(status, down):
    """The adopter of a down replica is up, is not the replica itself, and is unique: the
    replicas that are up agree on it (each computes it from the same retained statuses)."""
    status = {**status, down: "down"}
    pick = adopter_of(status, down)
    up = [r for r, s in status.items() if s == "up"]
    if not up:
        assert pick is None
        return
    assert pick in up and pick != down
    # the next one up after the down replica in name order, wrapping around
    after = sorted(r for r in up if r > down)
    assert pick == (after[0] if after else min(up))


@given(st.lists(st.tuples(st.integers(0, 3), st.text(max_size=12), st.integers(0, 2**32 - 1),
                          st.lists(st.text(max_size=8), max_size=4),
                          st.lists(st.text(max_size=8), max_size=2), st.booleans()),
                max_size=30))
def test_ledger_takes_any_partial_fields_without_raising(records):
    """Whatever a (compromised) region writes into its partials, reading it back never raises,
    batch numbers stay usable and every counted agent is covered."""
    led = Ledger("region-0")
    for round_id, batch, group, agents, declined, complete in records:
        led.add(round_id, batch, group, agents, declined=declined, complete=complete)
        assert led.next_batch(round_id, "x") >= 0
    for r in range(4):
        counted = led.counted(r)
        assert counted <= led.covered(r)


def test_malformed_partials_never_count():
    from regional_aggregator.ledger import well_formed
    from schemas import fedstream_pb2 as pb

    ok = pb.PartialChunk(region="region-0", agents=["a", "b"], weights=[8, 8], group=0,
                         group_count=1, batch="x/0")
    assert well_formed(ok)
    for bad in (dict(group=1), dict(group_count=2000), dict(weights=[8]),
                dict(agents=["a", "a"]), dict(batch="b" * 65), dict(multiplicities=[1])):
        p = pb.PartialChunk()
        p.CopyFrom(ok)
        for k, v in bad.items():
            if isinstance(v, list):
                getattr(p, k)[:] = v
            else:
                setattr(p, k, v)
        assert not well_formed(p), bad
    empty = pb.PartialChunk(region="region-0", declined=["c"], region_complete=True)
    assert well_formed(empty)  # a closing batch without groups


def test_global_adds_each_batchs_evaluation_once():
    """Federated-evaluation sums ride on each batch's first chunk: two regions' batches of the
    same name both count, a second batch of one region counts, a repeat does not."""
    from global_aggregator.service import GlobalAggregator
    from schemas import fedstream_pb2 as pb

    seen: set[tuple[str, str]] = set()
    sums = pb.EvalSums()
    for region, batch in (("region-0", "/0"), ("region-1", "/0"), ("region-0", "/1"),
                          ("region-0", "/0")):
        part = pb.PartialChunk(region=region, batch=batch,
                               eval=pb.EvalSums(loss_sum=1.0, accuracy_sum=2.0, count=4))
        GlobalAggregator._add_eval(part, seen, sums)
    assert (sums.loss_sum, sums.accuracy_sum, sums.count) == (3.0, 6.0, 12)
    GlobalAggregator._add_eval(pb.PartialChunk(region="region-2"), seen, sums)  # no eval
    assert sums.count == 12
