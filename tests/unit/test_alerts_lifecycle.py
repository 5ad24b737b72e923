"""The alert lifecycle as alerts merges it (docs/clinical-records.md, "The alert lifecycle").

Scoring raises, revises, supersedes and withdraws an alert with events on two topics, which the
alerts service hears in any order. These are the pure rules; the store applies the same rules
with conditional writes (tests/integration/test_alerts_lifecycle.py checks they agree).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.alerts import rules
from services.alerts.rules import api_status, lifecycle_key, lifecycle_order, lifecycle_status, merge_lifecycle
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration

NOW = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
TENANT = "t1"
Event = AllianceDeterioration | AlertStatusChanged


def alert_id(session: int = 4) -> str:
    return ids.alert_id(TENANT, "client-7", "SRS", "ep-1", session)


def raised(revision: int, session: int = 4) -> AllianceDeterioration:
    a = alert_id(session)
    return AllianceDeterioration(
        event_id=ids.alert_event_id(a, revision), tenant_id=TENANT, occurred_at=NOW, submission_id="s1",
        site_id="site-a", clinician_id="c1", client_id="client-7", episode_id="ep-1", session_number=session,
        administered_at=NOW, alert_id=a, triggers=["below_cutoff"], severity="warning", total=30.0, cutoff=36.0,
        revision=revision)


def ended(status: str, revision: int | None, session: int = 4) -> AlertStatusChanged:
    a = alert_id(session)
    return AlertStatusChanged.model_validate({
        "event_id": ids.alert_status_event_id(TENANT, a, status, revision), "tenant_id": TENANT, "occurred_at": NOW,
        "alert_id": a, "site_id": "site-a", "clinician_id": "c1", "status": status, "revision": revision,
        "client_id": "client-7", "instrument": "SRS", "episode_id": "ep-1", "session_number": session})


def final(events: list[Event]) -> str:
    return merge_lifecycle(events)[alert_id()]


# ---- the order --------------------------------------------------------------------------------


def test_within_a_revision_raised_comes_before_superseded_before_withdrawn() -> None:
    assert lifecycle_key("raised", 2) < lifecycle_key("superseded", 2) < lifecycle_key("withdrawn", 2)


def test_a_later_revision_comes_after_anything_of_an_earlier_one() -> None:
    assert lifecycle_key("withdrawn", 1) < lifecycle_key("raised", 2)


def test_statuses_alerts_decides_itself_are_not_part_of_the_lifecycle() -> None:
    with pytest.raises(ValueError):
        lifecycle_key("acknowledged", 1)


def test_revision_zero_is_not_a_revision() -> None:
    with pytest.raises(ValueError):
        lifecycle_key("raised", 0)


lifecycle_statuses = st.sampled_from(["raised", "superseded", "withdrawn"])
revisions = st.integers(min_value=1, max_value=10**8 - 1)


@given(lifecycle_statuses, revisions, lifecycle_statuses, revisions)
def test_the_stored_order_string_sorts_exactly_like_the_key(s1: str, r1: int, s2: str, r2: int) -> None:
    a, b = (s1, r1), (s2, r2)
    assert (lifecycle_order(*a) < lifecycle_order(*b)) == (lifecycle_key(*a) < lifecycle_key(*b))
    assert (lifecycle_order(*a) == lifecycle_order(*b)) == (lifecycle_key(*a) == lifecycle_key(*b))


@given(lifecycle_statuses, revisions)
def test_the_stored_order_string_tells_its_status(status: str, revision: int) -> None:
    assert lifecycle_status(lifecycle_order(status, revision)) == ("open" if status == "raised" else status)


# ---- the merge --------------------------------------------------------------------------------


@pytest.mark.parametrize(("events", "expected"), [
    ([raised(1)], "open"),
    ([raised(1), raised(2)], "open"),  # a correction that still triggers revises the alert
    ([raised(1), ended("withdrawn", 1)], "withdrawn"),
    ([raised(1), ended("superseded", 1)], "superseded"),
    ([raised(1), raised(2), ended("superseded", 2)], "superseded"),
    ([raised(1), ended("superseded", 1), raised(2)], "open"),  # latest again, with triggers: raised again
    ([raised(1), ended("withdrawn", 1), raised(2)], "open"),
    ([raised(2), ended("withdrawn", 1)], "open"),  # the withdrawal ended revision 1 only
    ([ended("superseded", 2), ended("withdrawn", 2)], "withdrawn"),
    ([ended("withdrawn", 1)], "withdrawn"),  # the raise it ends has not arrived yet
])
def test_the_final_status_is_that_of_the_greatest_event(events: list[Event], expected: str) -> None:
    for order in itertools.permutations(events):
        assert final(list(order)) == expected, order


def test_redelivered_events_change_nothing() -> None:
    events: list[Event] = [raised(1), ended("withdrawn", 1)]
    assert final(events + events + [raised(1)]) == "withdrawn"


def test_acknowledged_and_escalated_events_do_not_move_the_lifecycle() -> None:
    assert final([raised(1), ended("acknowledged", None), ended("escalated", None)]) == "open"
    assert merge_lifecycle([ended("acknowledged", None)]) == {}


def test_a_lifecycle_status_without_a_revision_is_ignored() -> None:
    assert final([raised(1), ended("withdrawn", None)]) == "open"


def test_each_alert_is_merged_on_its_own() -> None:
    merged = merge_lifecycle([raised(1, session=4), ended("superseded", 1, session=4), raised(1, session=5)])
    assert merged == {alert_id(4): "superseded", alert_id(5): "open"}


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """Any set of events scoring may publish for one alert: raises and ends of revisions 1..4."""
    events: list[Event] = []
    for revision in range(1, draw(st.integers(min_value=1, max_value=4)) + 1):
        if draw(st.booleans()):
            events.append(raised(revision))
        if draw(st.booleans()):
            events.append(ended(draw(st.sampled_from(["superseded", "withdrawn"])), revision))
    return events or [raised(1)]


@given(histories(), st.integers(min_value=0, max_value=3), st.data())
def test_any_arrival_order_with_redeliveries_yields_the_same_final_status(
        events: list[Event], repeats: int, data: st.DataObject) -> None:
    arrived = data.draw(st.permutations(events + [events[i % len(events)] for i in range(repeats)]))
    assert merge_lifecycle(arrived) == merge_lifecycle(events)


@given(histories())
def test_the_final_status_is_that_of_the_greatest_key_seen(events: list[Event]) -> None:
    _, rank = max(k for e in events if (k := rules.event_lifecycle_key(e)) is not None)
    assert final(events) == ("open", "superseded", "withdrawn")[rank]


# ---- what the API shows -----------------------------------------------------------------------


@pytest.mark.parametrize(("lifecycle", "acknowledged", "shown"), [
    ("open", False, "open"),
    ("open", True, "acknowledged"),  # a revision keeps the acknowledgement
    ("superseded", False, "superseded"),
    ("superseded", True, "superseded"),
    ("withdrawn", True, "withdrawn"),
])
def test_the_api_status_puts_the_lifecycle_before_the_acknowledgement(
        lifecycle: str, acknowledged: bool, shown: str) -> None:
    assert api_status(lifecycle, acknowledged) == shown
