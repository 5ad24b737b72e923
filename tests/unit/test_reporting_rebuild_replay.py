"""A rebuild's replay: the partitions read in step by timestamp, and the counter moves it holds."""

from __future__ import annotations

from aiokafka import TopicPartition

from services.reporting.rebuild import in_step
from services.reporting.store import CounterTally

SCORED, ALERTS, STATUS = (TopicPartition("srs.scored.v1", 0), TopicPartition("alliance.deterioration.v1", 0),
                          TopicPartition("alliance.alert-status.v1", 0))


def test_a_partition_read_further_ahead_than_the_skew_waits_for_the_one_furthest_behind() -> None:
    read_to = {SCORED: 10_000, ALERTS: 12_000, STATUS: 12_001}
    assert in_step([SCORED, ALERTS, STATUS], read_to, skew_ms=2_000) == [SCORED, ALERTS]


def test_every_partition_is_read_while_one_has_not_delivered_a_record_yet() -> None:
    read_to = {SCORED: 10_000, ALERTS: 90_000}
    assert in_step([SCORED, ALERTS, STATUS], read_to, skew_ms=2_000) == [SCORED, ALERTS, STATUS]


def test_the_partition_furthest_behind_is_read_even_with_no_skew_allowed() -> None:
    read_to = {SCORED: 10_000, ALERTS: 9_000, STATUS: 9_500}
    assert in_step([SCORED, ALERTS, STATUS], read_to, skew_ms=0) == [ALERTS]


def test_a_partition_at_its_end_holds_back_no_other() -> None:
    read_to = {SCORED: 1_000, ALERTS: 50_000}  # SCORED is at its end: not pending
    assert in_step([ALERTS], read_to, skew_ms=2_000) == [ALERTS]


def test_a_tallys_memory_grows_with_the_fields_it_holds_not_with_the_moves_added() -> None:
    tally = CounterTally()
    moves = {("t", "s", "c", "srs", ""): {"records": 1, "sessions": 5},
             ("t", "s", "c", "srs", "2026-01"): {"sessions": 2, "clients": 1}}
    tally.add(moves)
    once = tally.held_bytes
    for _ in range(100):
        tally.add(moves)
    assert once > 0 and tally.held_bytes == once
    tally.add({("t", "s", "c2", "srs", ""): {"records": 1}})
    assert tally.held_bytes > once
