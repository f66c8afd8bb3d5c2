"""Lag arithmetic: records and seconds from stored and end offsets and the oldest unwritten
record's timestamp; which fetched record counts as in hand; the lookup cache; and the book of
what an agent knows of its partitions' lag (``LagBook``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.batching import Batch
from pipeline.lag import LagBook, OldestRecords, PartitionLag, partition_lag, timestamp_in_hand

NOW = 1_790_000_000.0


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    serialized_value_size: int = 1


def test_lag_seconds_is_now_minus_the_oldest_unwritten_records_timestamp() -> None:
    lag = partition_lag(NOW, stored=100, end=130, oldest_ms=int((NOW - 42.5) * 1000))
    assert lag == PartitionLag(stored=100, end=130, records=30, seconds=pytest.approx(42.5))


def test_caught_up_is_zero_records_and_zero_seconds_whatever_the_timestamp() -> None:
    assert partition_lag(NOW, 130, 130, 0) == PartitionLag(130, 130, 0, 0.0)
    assert partition_lag(NOW, 130, 130, None) == PartitionLag(130, 130, 0, 0.0)


def test_an_end_offset_older_than_the_stored_offset_counts_as_caught_up() -> None:
    # The end offset was learnt before the last commit moved the stored offset past it.
    assert partition_lag(NOW, 140, 130, None) == PartitionLag(140, 140, 0, 0.0)


def test_an_unknown_timestamp_leaves_seconds_unknown() -> None:
    assert partition_lag(NOW, 100, 130, None).seconds is None
    assert partition_lag(NOW, 100, 130, -1).seconds is None  # a record without a timestamp


def test_only_markers_between_the_offsets_is_zero_seconds() -> None:
    lag = partition_lag(NOW, 100, 101, None, markers_only=True)
    assert (lag.records, lag.seconds) == (1, 0.0)


def test_a_record_from_the_future_is_zero_seconds_old() -> None:
    assert partition_lag(NOW, 1, 2, int((NOW + 5) * 1000)).seconds == 0.0


def _batch(partition: tuple[str, int], offsets: list[int]) -> Batch:
    batch = Batch(1)
    records = [Rec(partition[0], partition[1], o, 1000 + o) for o in offsets]
    batch.add(partition, records, ([], []), 0.0)
    return batch


def test_only_a_record_at_exactly_the_stored_offset_is_in_hand() -> None:
    writing = _batch(("m", 0), [10, 11, 12])
    filling = _batch(("m", 0), [13, 14, 20])
    batches = (writing, filling)
    assert timestamp_in_hand(batches, ("m", 0), 10) == 1010
    assert timestamp_in_hand(batches, ("m", 0), 13) == 1013  # the next batch holds it
    assert timestamp_in_hand(batches, ("m", 0), 15) is None  # a gap: look it up
    assert timestamp_in_hand(batches, ("m", 0), 9) is None
    assert timestamp_in_hand(batches, ("m", 1), 10) is None
    assert timestamp_in_hand((None, filling), ("m", 0), 14) == 1014


def test_looked_up_timestamps_hold_for_their_offset_only() -> None:
    oldest = OldestRecords()
    assert oldest.get(("m", 0), 5) == (False, None)
    oldest.put(("m", 0), 5, 1234)
    assert oldest.get(("m", 0), 5) == (True, 1234)
    assert oldest.get(("m", 0), 6) == (False, None)  # the stored offset moved on
    oldest.put(("m", 1), 7, None)  # only markers there
    assert oldest.get(("m", 1), 7) == (True, None)
    oldest.forget([("m", 0), ("x", 9)])
    assert oldest.get(("m", 0), 5) == (False, None)


M0, M1 = ("m", 0), ("m", 1)


def test_the_newest_end_offset_known_stands() -> None:
    book = LagBook()
    assert book.ends.get(M0) is None
    assert book.note_end(M0, 120) == 120
    assert book.note_end(M0, 110) == 120  # an answer older than one seen since
    assert book.note_end(M0, 130) == 130
    assert dict(book.ends) == {M0: 130}


def test_a_record_in_hand_gives_the_seconds_before_a_lookup_does() -> None:
    book = LagBook()
    book.found(M0, 100, int((NOW - 60) * 1000))
    lag = book.measure(M0, 100, 130, NOW, in_hand_ms=int((NOW - 42.5) * 1000))
    assert lag == PartitionLag(100, 130, 30, pytest.approx(42.5))
    assert book.measure(M0, 100, 130, NOW, None).seconds == pytest.approx(60.0)


def test_a_lookup_holds_for_its_stored_offset_only() -> None:
    book = LagBook()
    assert book.needs_lookup(M0, 100, 130)
    assert not book.needs_lookup(M0, 100, None)  # no end offset known yet
    assert not book.needs_lookup(M0, 130, 130)  # caught up: nothing waits
    book.found(M0, 100, int((NOW - 10) * 1000))
    assert not book.needs_lookup(M0, 100, 130)
    assert book.needs_lookup(M0, 120, 130)  # a commit moved the stored offset


def test_only_markers_found_is_zero_seconds_though_the_offsets_differ() -> None:
    book = LagBook()
    book.found(M0, 100, None)
    assert book.measure(M0, 100, 103, NOW, None) == PartitionLag(100, 103, 3, 0.0)


def test_without_a_timestamp_the_last_seconds_stand_and_records_move_on() -> None:
    book = LagBook()
    assert book.measure(M0, 100, 130, NOW, None) == PartitionLag(100, 130, 30, None)
    book.measure(M0, 100, 130, NOW, int((NOW - 7) * 1000))
    # Committed up to 120; the record at 120 is neither in hand nor looked up yet.
    assert book.measure(M0, 120, 140, NOW, None) == PartitionLag(120, 140, 20, pytest.approx(7.0))
    assert book.measure(M0, 140, 140, NOW, None) == PartitionLag(140, 140, 0, 0.0)


def test_seconds_behind_is_the_most_of_the_partitions_measured() -> None:
    book = LagBook()
    assert book.seconds_behind() == 0.0
    book.measure(M0, 0, 5, NOW, int((NOW - 3) * 1000))
    book.measure(M1, 0, 5, NOW, int((NOW - 9) * 1000))
    book.measure(("e", 0), 0, 5, NOW, None)  # not known yet: counts as 0
    assert book.seconds_behind() == pytest.approx(9.0)
    assert sorted(book.measured()) == [("e", 0), M0, M1]


def test_forgetting_a_partition_drops_its_lag_end_and_lookup() -> None:
    book = LagBook()
    book.note_end(M0, 50)
    book.found(M0, 10, 1234)
    book.measure(M0, 10, 50, NOW, None)
    book.note_end(M1, 8)
    book.forget([M0])
    assert dict(book.ends) == {M1: 8}
    assert book.measured() == []
    assert book.needs_lookup(M0, 10, 50)  # its lookup went too
    assert book.measure(M0, 10, 50, NOW, None).seconds is None  # and its last seconds
