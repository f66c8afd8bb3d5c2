"""Ownership: the agent's per-partition and per-stream facts, driven by events, no IO.

Each test feeds events in the order the agent's actors can produce them and checks both the
actions returned and the facts afterwards. A random walk at the end checks the invariants
over every interleaving it reaches.
"""

from __future__ import annotations

import random

import pytest

from pipeline.batching import OffsetMove
from pipeline.ownership import NOTHING, Actions, Ownership, StreamState, UnknownStreamError

M0, M1 = ("agents.metrics", 0), ("agents.metrics", 1)
E0 = ("agents.events", 0)
TOPICS = {"agents.metrics": "metrics", "agents.events": "events"}


def positioned(offsets: dict[tuple[str, int], int] | None = None) -> Ownership:
    """An ownership with M0, M1, E0 assigned and positioned (at 10, 20, 30 by default)."""
    own = Ownership(TOPICS)
    own.assigned_event([M0, M1, E0])
    own.positioned_event(offsets or {M0: 10, M1: 20, E0: 30})
    return own


# -- assignment and positioning ---------------------------------------------------------------


def test_assigned_partitions_are_paused_forgotten_and_unpositioned() -> None:
    own = Ownership(TOPICS)
    actions = own.assigned_event([M0, E0])
    assert actions == Actions(forget=frozenset({M0, E0}), pause=frozenset({M0, E0}))
    assert sorted(own.unpositioned()) == [E0, M0]
    assert own.positions() == {}
    assert own.writable() == {}
    assert not own.may_fetch(M0)


def test_positioning_seeks_and_resumes() -> None:
    own = Ownership(TOPICS)
    own.assigned_event([M0, E0])
    actions = own.positioned_event({M0: 5, E0: 7})
    assert actions == Actions(seek={M0: 5, E0: 7}, resume=frozenset({M0, E0}))
    assert own.positions() == {M0: 5, E0: 7}
    assert own.unpositioned() == []
    assert own.may_fetch(M0) and own.may_fetch(E0)


def test_offsets_read_for_a_partition_revoked_meanwhile_are_ignored() -> None:
    own = Ownership(TOPICS)
    own.assigned_event([M0, E0])
    own.revoked_event([E0])  # revoked while the stored offsets were being read
    actions = own.positioned_event({M0: 5, E0: 7})
    assert actions == Actions(seek={M0: 5}, resume=frozenset({M0}))
    assert own.positions() == {M0: 5}


def test_an_already_positioned_partition_is_not_moved_by_a_late_read() -> None:
    own = positioned()
    own.committed_event([OffsetMove(*M0, 10, 15)])
    assert own.positioned_event({M0: 10}) == NOTHING  # a read from before the commit
    assert own.positions()[M0] == 15


def test_a_new_assignment_replaces_the_old_one_and_repositions_everything() -> None:
    own = positioned()
    actions = own.assigned_event([M1, E0])
    # M0 went away, M1 and E0 are read again from the database: the database wins.
    assert actions.forget == frozenset({M0, M1, E0})
    assert actions.pause == frozenset({M1, E0})
    assert sorted(own.unpositioned()) == [E0, M1]
    assert own.positions() == {}


# -- revocation -----------------------------------------------------------------------------


def test_revocation_forgets_fetched_records_and_the_position() -> None:
    own = positioned()
    actions = own.revoked_event([M0])
    assert actions == Actions(forget=frozenset({M0}))
    assert M0 not in own.positions()
    assert M0 not in own.assigned()


def test_revocation_mid_batch_keeps_the_commit_from_moving_the_partition() -> None:
    own = positioned()
    batch_moves = [OffsetMove(*M0, 10, 50), OffsetMove(*E0, 30, 40)]
    own.revoked_event([M0])  # the batch is being written when the rebalance comes
    own.committed_event(batch_moves)  # ... and commits (the fence let it: nobody moved M0)
    assert own.positions() == {M1: 20, E0: 40}


def test_a_partition_that_comes_straight_back_is_read_again_from_the_database() -> None:
    own = positioned()
    own.revoked_event([M0])
    actions = own.assigned_event([M0, M1, E0])
    assert M0 in actions.forget and M0 in actions.pause
    assert M0 in own.unpositioned()
    # The fetched copies of M0 must not be written: the batch forgets them, and nothing is
    # writable until positioned again.
    assert M0 not in own.writable()
    own.positioned_event({M0: 12, M1: 20, E0: 30})
    assert own.writable() == {M0: 12, M1: 20, E0: 30}


# -- commits and fences -------------------------------------------------------------------------


def test_a_commit_moves_positions_that_start_where_the_batch_started() -> None:
    own = positioned()
    own.committed_event([OffsetMove(*M0, 10, 11), OffsetMove(*M1, 19, 25)])
    assert own.positions() == {M0: 11, M1: 20, E0: 30}  # M1's move started elsewhere


def test_a_fence_unpositions_and_pauses_the_batch_partitions() -> None:
    own = positioned()
    actions = own.fenced_event([M0, E0, ("gone", 0)])
    assert actions == Actions(forget=frozenset({M0, E0}), pause=frozenset({M0, E0}))
    assert sorted(own.unpositioned()) == [E0, M0]
    assert own.writable() == {M1: 20}


def test_a_fence_during_a_retry_keeps_fenced_partitions_paused_after_release() -> None:
    own = positioned()
    assert own.hold_event() == Actions(pause=frozenset({M0, M1, E0}))
    assert own.holding and not own.may_fetch(M1)
    assert own.writable() == {M0: 10, M1: 20, E0: 30}  # a retried batch is still written
    own.fenced_event([M0])
    actions = own.release_event()
    assert actions == Actions(resume=frozenset({M1, E0}))
    assert not own.holding
    assert own.unpositioned() == [M0]
    assert own.release_event() == NOTHING  # released once


def test_positioning_while_holding_seeks_but_does_not_resume() -> None:
    own = Ownership(TOPICS)
    own.assigned_event([M0])
    own.hold_event()
    assert own.positioned_event({M0: 3}) == Actions(seek={M0: 3})
    assert own.release_event() == Actions(resume=frozenset({M0}))


def test_rewinding_seeks_positioned_partitions_back_to_the_stored_offset() -> None:
    own = positioned()
    own.fenced_event([E0])
    actions = own.rewound_event([M0, E0, ("gone", 0)])
    assert actions == Actions(forget=frozenset({M0, E0, ("gone", 0)}), seek={M0: 10})


# -- streams ------------------------------------------------------------------------------------


def test_deactivation_pauses_forgets_and_rewinds_the_stream() -> None:
    own = positioned()
    actions = own.deactivate_event(["metrics"])
    assert actions == Actions(
        forget=frozenset({M0, M1}), seek={M0: 10, M1: 20}, pause=frozenset({M0, M1})
    )
    assert own.writable() == {E0: 30}
    assert not own.may_fetch(M0)
    assert own.positions() == {M0: 10, M1: 20, E0: 30}  # still assigned and positioned
    assert own.stream_state("metrics") is StreamState.INACTIVE
    assert own.active_streams() == ["events"]


def test_activation_resumes_from_the_stored_offset_including_commits_made_meanwhile() -> None:
    own = positioned()
    own.deactivate_event(["metrics"])
    # A batch planned before the deactivation commits after it.
    own.committed_event([OffsetMove(*M0, 10, 14)])
    actions = own.activate_event(["metrics"])
    assert actions == Actions(
        forget=frozenset({M0, M1}), seek={M0: 14, M1: 20}, resume=frozenset({M0, M1})
    )
    assert own.writable() == {M0: 14, M1: 20, E0: 30}


def test_activating_an_active_stream_does_nothing() -> None:
    own = positioned()
    assert own.activate_event(["metrics", "events"]) == NOTHING


def test_an_unpositioned_partition_of_an_activated_stream_waits_for_its_offset() -> None:
    own = positioned()
    own.deactivate_event(["events"])
    own.fenced_event([E0])
    actions = own.activate_event(["events"])
    assert actions == Actions(forget=frozenset({E0}))
    assert own.positioned_event({E0: 33}) == Actions(seek={E0: 33}, resume=frozenset({E0}))


def test_activation_while_holding_resumes_only_on_release() -> None:
    own = positioned()
    own.deactivate_event(["metrics"])
    own.hold_event()
    actions = own.activate_event(["metrics"])
    assert actions.resume == frozenset()
    assert own.release_event().resume == frozenset({M0, M1, E0})


def test_a_failed_stream_stops_with_its_reason_until_activated() -> None:
    own = positioned()
    actions = own.failed_event("events", "42703 column properties does not exist")
    assert actions == Actions(forget=frozenset({E0}), seek={E0: 30}, pause=frozenset({E0}))
    assert own.stream_state("events") is StreamState.FAILED
    assert own.failure("events") == "42703 column properties does not exist"
    assert own.writable() == {M0: 10, M1: 20}
    # A retry releasing the hold does not resume a failed stream.
    own.hold_event()
    assert E0 not in own.release_event().resume
    # Deactivating a failed stream keeps the failure; activating clears it.
    own.deactivate_event(["events"])
    assert own.stream_state("events") is StreamState.FAILED
    actions = own.activate_event(["events"])
    assert actions.resume == frozenset({E0}) and actions.seek == {E0: 30}
    assert own.stream_state("events") is StreamState.ACTIVE
    assert own.failure("events") is None


def test_streams_may_start_switched_off() -> None:
    own = Ownership(TOPICS, active=["events"])
    own.assigned_event([M0, E0])
    actions = own.positioned_event({M0: 1, E0: 2})
    assert actions == Actions(seek={M0: 1, E0: 2}, resume=frozenset({E0}))
    assert own.writable() == {E0: 2}
    assert own.streams() == {"metrics": StreamState.INACTIVE, "events": StreamState.ACTIVE}


@pytest.mark.parametrize(
    "call",
    [
        lambda own: own.activate_event(["metrics", "nope"]),
        lambda own: own.deactivate_event(["config"]),
        lambda own: own.failed_event("nope", "why"),
        lambda own: Ownership(TOPICS, active=["metrics", "config"]),
    ],
)
def test_a_stream_this_agent_does_not_consume_is_an_error_that_changes_nothing(call) -> None:  # type: ignore[no-untyped-def]
    own = positioned()
    with pytest.raises(UnknownStreamError, match="not consumed by this agent"):
        call(own)
    assert own.active_streams() == ["metrics", "events"]
    assert own.writable() == {M0: 10, M1: 20, E0: 30}


# -- every interleaving a random walk reaches ---------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_random_event_sequences_keep_the_invariants(seed: int) -> None:
    """Against a model of the consumer (assigned, paused, fetch position), after every event:
    a fetching partition is positioned, active and not held, and its fetch position is its
    stored offset or past it only by what it fetched since; nothing unpositioned or inactive
    is writable; pause and resume never overlap."""
    rng = random.Random(seed)
    partitions = [M0, M1, E0, ("agents.events", 1)]
    own = Ownership(TOPICS)
    paused: set[tuple[str, int]] = set()
    fetch_at: dict[tuple[str, int], int] = {}
    end = {p: 0 for p in partitions}  # records in the log
    stored = {p: 0 for p in partitions}  # the database's offsets

    def apply(actions: Actions) -> None:
        assert not (actions.pause & actions.resume)
        assigned = set(own.assigned())
        for p, offset in actions.seek.items():
            fetch_at[p] = offset
        paused.update(p for p in actions.pause if p in assigned)
        paused.difference_update(actions.resume)

    for _ in range(400):
        for p in partitions:
            end[p] += rng.randrange(3)
        event = rng.randrange(10)
        if event == 0:
            chosen = rng.sample(partitions, rng.randrange(1, len(partitions) + 1))
            apply(own.revoked_event(own.assigned()))
            paused.clear()
            apply(own.assigned_event(chosen))
        elif event == 1:
            apply(own.positioned_event({p: stored[p] for p in own.unpositioned()}))
        elif event == 2:  # fetch from every partition the consumer would fetch
            for p in own.assigned():
                if p not in paused and p in fetch_at:
                    fetch_at[p] = end[p]
        elif event == 3:  # write what was fetched of writable partitions
            moves = [
                OffsetMove(*p, offset, fetch_at[p])
                for p, offset in own.writable().items()
                if fetch_at.get(p, offset) > offset and stored[p] == offset
            ]
            for m in moves:
                stored[(m.topic, m.partition)] = m.new
            own.committed_event(moves)
        elif event == 4:  # another owner moves a partition: our next batch is fenced
            p = rng.choice(partitions)
            stored[p] += 1
            if p in own.writable():
                apply(own.fenced_event([p]))
        elif event == 5:
            apply(own.deactivate_event([rng.choice(["metrics", "events"])]))
        elif event == 6:
            apply(own.activate_event([rng.choice(["metrics", "events"])]))
        elif event == 7:
            apply(own.failed_event(rng.choice(["metrics", "events"]), "broken"))
        elif event == 8:
            apply(own.hold_event() if not own.holding else own.release_event())
        else:
            apply(own.rewound_event(own.assigned()))

        for p in own.assigned():
            fetching = p not in paused
            if fetching:
                assert own.may_fetch(p), (seed, p)
            writable = own.writable()
            if p in writable:
                # What a batch writes starts at the stored offset the agent believes, and the
                # database agrees unless another owner moved it (then the fence catches it).
                assert p in own.positions()
            if own.may_fetch(p):
                assert p not in paused
                assert fetch_at[p] >= own.positions()[p]
        assert set(own.writable()) <= set(own.positions())
        for p in own.unpositioned():
            assert p in paused, (seed, p)
