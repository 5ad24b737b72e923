"""One client's clinical record (services/scoring/series.py), one behaviour per test.

Every rule here is from docs/clinical-records.md: severity, corrections (same id, new id,
identical resends), the alert lifecycle, derived episodes, the session gap, site ownership and
transfers, redelivery, and the stored form of the state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.reporting import rules as reporting
from services.scoring import handlers, series
from services.scoring import rules as R
from services.scoring.rules import TenantRules
from services.scoring.series import (
    AlertView,
    ClientState,
    SessionView,
    Version,
    current_versions,
    derive,
    derived_episode_id,
    episodes_of,
    record_key,
)
from services.scoring.store import ClientKey, state_doc, state_from
from shared import ids
from shared.events import Severity

TENANT, CLIENT = "acme", "c-1"
SEPT = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
NOV = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
ACCEPTED = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RULES = TenantRules()
Four = tuple[float, float, float, float]


@dataclass
class Client:
    """One client's state, fed the way the handler feeds it: each version accepted after the last."""

    rules: TenantRules = RULES
    state: ClientState = field(default_factory=lambda: ClientState(TENANT, CLIENT))
    _accepted: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def version(self, sid: str, n: int, total: float | None = None, *, items: Four | None = None,
                at: datetime | None = None, episode: str | None = None, site: str = "north",
                clinician: str = "c-1", instrument: str = "SRS") -> Version:
        """A version of `sid` for session `n`, administered `at` (default: Sept 1 + n - 1 days)."""
        administered = at if at is not None else SEPT + timedelta(days=n - 1)
        accepted = ACCEPTED + timedelta(seconds=next(self._accepted))
        return Version(sid, instrument, episode, n, administered, site, clinician, items,
                       None if items is not None else total, accepted)

    def now(self) -> datetime:
        return NOW + timedelta(milliseconds=next(self._clock))

    def submit(self, sid: str, n: int, total: float | None = None, **kw: object) -> series.Step:
        return self.apply(self.version(sid, n, total, **kw))  # type: ignore[arg-type]

    def apply(self, v: Version) -> series.Step:
        return self.state.submit(v, self.rules, self.now())

    def transfer(self, event_id: str, site: str) -> series.Step:
        """A transfer accepted after every version so far (it shares their partition)."""
        accepted = ACCEPTED + timedelta(seconds=next(self._accepted))
        return self.state.transfer(event_id, site, self.rules, self.now(), accepted)

    def feed(self, *totals: float) -> list[series.Step]:
        """Sessions 1..n with these totals, on consecutive days from Sept 1."""
        return [self.submit(f"s{n}", n, t) for n, t in enumerate(totals, start=1)]


def scored(step: series.Step | list[series.Output]) -> list[series.ScoredOut]:
    outputs = step.outputs if isinstance(step, series.Step) else step
    return [o for o in outputs if isinstance(o, series.ScoredOut)]


def alerts(step: series.Step | list[series.Output]) -> list[series.AlertOut]:
    outputs = step.outputs if isinstance(step, series.Step) else step
    return [o for o in outputs if isinstance(o, series.AlertOut)]


def statuses(step: series.Step | list[series.Output]) -> list[series.StatusOut]:
    outputs = step.outputs if isinstance(step, series.Step) else step
    return [o for o in outputs if isinstance(o, series.StatusOut)]


def one_scored(step: series.Step, sid: str) -> series.ScoredOut:
    (o,) = [o for o in scored(step) if o.session.version.submission_id == sid]
    return o


def alert_id(n: int, episode: str = "auto/2026-09-01/1") -> str:
    return ids.alert_id(TENANT, CLIENT, "SRS", episode, n)


def severity_of(*totals: float) -> str | None:
    """The severity of the alert the last of these sessions raises (None: no alert)."""
    steps = Client().feed(*totals)
    raised = alerts(steps[-1])
    return raised[0].alert.severity if raised else None


def items_of(o: series.ScoredOut) -> Four | None:
    return o.session.version.items


# --- severity ---------------------------------------------------------------------------------


def test_30_then_30_is_a_warning() -> None:
    assert severity_of(30.0, 30.0) == "warning"


def test_30_then_30_then_30_is_critical_three_low_sessions_without_a_rise() -> None:
    assert severity_of(30.0, 30.0, 30.0) == "critical"


def test_36_5_then_35_4_is_critical_below_the_cutoff_and_dropped() -> None:
    assert severity_of(36.5, 35.4) == "critical"


def test_40_then_36_5_is_critical_a_drop_of_three_or_more() -> None:
    assert severity_of(40.0, 36.5) == "critical"


def test_39_9_then_37_0_is_a_warning_a_drop_under_three_above_the_cutoff() -> None:
    assert severity_of(39.9, 37.0) == "warning"


def test_a_first_session_below_the_cutoff_is_a_warning() -> None:
    assert severity_of(30.0) == "warning"


def test_low_then_a_rise_still_low_is_a_warning_not_critical() -> None:
    assert severity_of(30.0, 30.0, 31.0) == "warning"


def test_no_trigger_no_alert() -> None:
    assert severity_of(38.0, 38.0) is None


def test_low_items_are_named_in_the_session_and_in_the_alert() -> None:
    c = Client()
    step = c.submit("s1", 1, items=(10.0, 8.5, 9.0, 7.0))
    (s,), (a,) = scored(step), alerts(step)
    assert s.session.low_items == ("goals", "overall") and s.session.total == 34.5
    assert R.ITEM_BELOW_THRESHOLD in s.session.flags and R.ITEM_BELOW_THRESHOLD not in a.alert.triggers
    assert a.alert.session.low_items == ("goals", "overall")
    event = handlers.alert_event(TENANT, CLIENT, a)
    assert event.low_items == ["goals", "overall"]


def test_a_session_that_is_not_the_latest_shows_its_triggers_and_severity_but_holds_no_alert() -> None:
    c = Client()
    c.feed(38.0, 38.0)
    step = c.submit("late", 3, 30.0, at=SEPT + timedelta(hours=1))  # administered before s2, later number
    assert alerts(step) == []
    # 1 then 3 on Sept 1, then 2 on Sept 2: 2 <= 3 begins a new episode, which is the current one
    late = one_scored(step, "late")
    assert late.session.triggers == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS) and late.session.severity == "critical"
    assert late.latest is False


def test_scored_event_carries_cutoff_operator_triggers_and_severity() -> None:
    c = Client(rules=TenantRules(cutoff=38.0, operator="<="))
    (s,) = scored(c.submit("s1", 1, 38.0))
    event = handlers.scored_event(TENANT, CLIENT, s)
    assert (event.cutoff, event.operator, event.triggers, event.severity) == (38.0, "<=", ["below_cutoff"], "warning")


# --- corrections under the same submission id ---------------------------------------------------


def test_correction_under_the_same_id_shows_the_new_items_and_their_total_as_revision_2() -> None:
    c = Client()
    c.submit("s1", 1, items=(9.0, 9.0, 9.0, 9.0))
    fixed = one_scored(c.submit("s1", 1, items=(10.0, 9.5, 9.0, 9.5)), "s1")
    assert items_of(fixed) == (10.0, 9.5, 9.0, 9.5) and fixed.session.total == 38.0
    assert fixed.revision == 2 and fixed.supersedes is None
    event = handlers.scored_event(TENANT, CLIENT, fixed)
    assert event.items is not None and sum(event.items.values()) == event.total
    assert event.event_id == ids.scored_event_id(TENANT, "s1", 2)


def test_correction_from_items_to_a_total_shows_no_items() -> None:
    c = Client()
    c.submit("s1", 1, items=(9.0, 9.0, 9.0, 9.0))
    fixed = one_scored(c.submit("s1", 1, 37.0), "s1")
    assert items_of(fixed) is None and fixed.session.total == 37.0


def test_correction_under_the_same_id_recomputes_the_flags() -> None:
    c = Client()
    (first,) = scored(c.submit("s1", 1, 30.0))
    assert first.session.flags == (R.BELOW_CUTOFF,)
    fixed = one_scored(c.submit("s1", 1, 38.0), "s1")
    assert fixed.session.flags == () and fixed.session.triggers == () and fixed.session.severity is None


def test_correction_recomputes_the_next_sessions_previous_total_and_change_as_its_next_revision() -> None:
    c = Client()
    c.feed(38.0, 36.5)
    step = c.submit("s1", 1, 37.0)
    nxt = one_scored(step, "s2")
    assert (nxt.session.previous_total, nxt.session.change_from_previous) == (37.0, -0.5)
    assert nxt.session.flags == () and nxt.revision == 2
    assert [o.session.version.submission_id for o in scored(step)] == ["s1", "s2"]


def test_correction_recomputes_every_later_session_of_the_episode() -> None:
    c = Client()
    c.feed(38.0, 30.0, 30.0)
    step = c.submit("s2", 2, 38.0)
    third = one_scored(step, "s3")
    assert third.session.previous_total == 38.0 and third.session.flags == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS)
    assert third.revision == 2


def test_correction_that_changes_nothing_the_next_session_shows_does_not_republish_it() -> None:
    c = Client()
    c.submit("s1", 1, items=(9.0, 9.0, 10.0, 10.0))
    c.submit("s2", 2, 38.0)
    step = c.submit("s1", 1, items=(10.0, 10.0, 9.0, 9.0))  # same total, other items
    assert [o.session.version.submission_id for o in scored(step)] == ["s1"]


def test_older_version_of_a_submission_arriving_late_changes_nothing_shown() -> None:
    c = Client()
    old = c.version("s1", 1, 30.0)
    c.submit("s1", 1, 38.0)
    step = c.apply(old)
    assert step.outputs == [] and step.rejection is None
    assert c.state.versions["s1"].total == 38.0
    # Only remembered as the submission's earliest version (what a derived episode is named by).
    assert c.state.versions["s1"].origin == old.first()


def test_a_version_older_than_an_identical_resend_of_the_current_content_changes_nothing() -> None:
    # 35.4 accepted first and again last, 30.0 in between but arriving last: 35.4 is the newest word.
    c = Client()
    first, between, last = c.version("s1", 1, 35.4), c.version("s1", 1, 30.0), c.version("s1", 1, 35.4)
    c.apply(first)
    c.apply(last)
    step = c.apply(between)
    assert step.outputs == [] and c.state.versions["s1"].total == 35.4


def test_the_newest_acceptance_of_the_current_content_is_kept_in_the_stored_state() -> None:
    c = Client()
    first, between, last = c.version("s1", 1, 35.4), c.version("s1", 1, 30.0), c.version("s1", 1, 35.4)
    c.apply(first)
    c.apply(last)
    key = ClientKey(TENANT, CLIENT)
    stored = state_from(key, state_doc(key, c.state, 1))
    stored.submit(between, RULES, NOW)
    assert stored.versions["s1"].total == 35.4


# --- corrections under a new id, identical resends -------------------------------------------


def test_correction_under_a_new_id_names_the_replaced_submission_in_supersedes() -> None:
    c = Client()
    c.feed(38.0)
    fix = one_scored(c.submit("s1-fix", 1, 35.0), "s1-fix")
    assert fix.supersedes == "s1" and fix.revision == 2 and fix.session.total == 35.0
    event = handlers.scored_event(TENANT, CLIENT, fix)
    assert event.supersedes == "s1" and event.submission_id == "s1-fix"


def test_session_after_a_correction_under_a_new_id_compares_with_the_corrected_total() -> None:
    c = Client()
    c.feed(38.0)
    c.submit("s1-fix", 1, 37.0)
    (s2,) = scored(c.submit("s2", 2, 36.5))
    assert s2.session.previous_total == 37.0 and s2.session.flags == ()


def test_identical_resend_under_the_same_id_publishes_nothing() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s2", 2, 30.0)  # accepted again (a new accepted time), same content
    assert step.outputs == [] and step.rejection is None and not step.redelivered


def test_identical_resend_under_a_new_id_publishes_nothing_and_is_rejected_as_duplicate() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s2-again", 2, 30.0)
    assert step.outputs == []
    assert step.rejection is not None and step.rejection.reason == "duplicate"
    assert "'s2'" in step.rejection.detail


def test_duplicate_rejection_is_given_again_when_the_resend_is_redelivered() -> None:
    c = Client()
    c.feed(38.0)
    dup = c.version("s1-again", 1, 38.0)
    first = c.apply(dup)
    again = c.apply(dup)
    assert again.redelivered and again.rejection == first.rejection


def test_a_correction_back_to_content_an_older_submission_holds_is_told_duplicate_naming_it() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    c.submit("s2-fix", 2, 36.0)  # a correction under a new id ...
    step = c.submit("s2-back", 2, 30.0)  # ... and back to what s2 said, under a third id
    (o,) = scored(step)
    assert o.session.version.submission_id == "s2" and o.supersedes == "s2-fix" and o.session.total == 30.0
    assert step.rejection is not None and step.rejection.reason == "duplicate"
    assert "'s2'" in step.rejection.detail


def test_stale_version_under_a_new_id_arriving_after_its_correction_is_named_superseded() -> None:
    c = Client()
    stale = c.version("s1-old", 1, 30.0)  # accepted first ...
    c.submit("s1-new", 1, 38.0)  # ... but the correction arrived first
    step = c.apply(stale)
    (o,) = scored(step)
    assert o.session.version.submission_id == "s1-new" and o.supersedes == "s1-old" and o.revision == 2
    assert alerts(step) == []


def test_current_versions_keeps_the_newest_content_represented_by_its_first_submission() -> None:
    c = Client()
    a, fix, a_again = c.version("a", 1, 30.0), c.version("b", 1, 38.0), c.version("c", 1, 38.0)
    by_key, members = current_versions([a_again, fix, a])
    (winner,) = by_key.values()
    assert winner.submission_id == "b" and members == {"b", "c"}


# --- the alert lifecycle ----------------------------------------------------------------------


def test_correction_that_clears_the_triggers_of_the_latest_session_withdraws_its_alert() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s2", 2, 38.0)
    assert alerts(step) == []
    (status,) = statuses(step)
    assert status.status == "withdrawn" and status.alert_id == alert_id(2) and status.record.revision == 1
    event = handlers.status_event(TENANT, CLIENT, status)
    assert (event.status, event.revision, event.session_number, event.episode_id) == (
        "withdrawn", 1, 2, "auto/2026-09-01/1")


def test_correction_that_still_triggers_raises_the_alert_again_as_revision_2() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s2", 2, 35.0)
    (a,) = alerts(step)
    assert a.alert.alert_id == alert_id(2) and a.revision == 2 and a.alert.session.total == 35.0
    assert statuses(step) == []
    assert handlers.alert_event(TENANT, CLIENT, a).event_id == ids.alert_event_id(alert_id(2), 2)


def test_correction_that_changes_nothing_the_alert_shows_does_not_raise_it_again() -> None:
    c = Client()
    c.submit("s1", 1, items=(9.0, 9.0, 9.0, 9.0))
    c.submit("s2", 2, 30.0)
    step = c.submit("s1", 1, items=(9.5, 9.5, 8.5, 8.5))  # same total, so s2 is unchanged
    assert alerts(step) == [] and statuses(step) == []


def test_a_later_session_supersedes_the_earlier_alert_it_does_not_withdraw_it() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s3", 3, 38.0)
    (status,) = statuses(step)
    assert status.status == "superseded" and status.alert_id == alert_id(2) and status.record.revision == 1
    assert alerts(step) == []


def test_a_later_low_session_raises_its_own_alert_and_supersedes_the_earlier() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s3", 3, 29.0)
    (a,), (status,) = alerts(step), statuses(step)
    assert a.alert.alert_id == alert_id(3) and a.revision == 1
    assert (status.alert_id, status.status) == (alert_id(2), "superseded")


def test_correction_of_an_earlier_session_revises_the_latest_alert() -> None:
    c = Client()
    c.feed(30.0, 30.0, 30.0)  # s3 critical: three low sessions
    step = c.submit("s2", 2, 38.0)
    (a,) = alerts(step)
    assert a.alert.alert_id == alert_id(3) and a.revision == 2
    assert a.alert.triggers == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS) and a.alert.session.previous_total == 38.0


def test_a_withdrawn_alert_whose_session_triggers_again_is_raised_with_the_next_revision() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    c.submit("s2", 2, 38.0)  # withdrawn, revision 1
    (a,) = alerts(c.submit("s2", 2, 31.0))
    assert a.alert.alert_id == alert_id(2) and a.revision == 2


def test_alert_id_is_the_same_across_corrections_under_a_new_id() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    (a,) = alerts(c.submit("s2-fix", 2, 31.0))
    assert a.alert.alert_id == alert_id(2) and a.revision == 2 and a.alert.session.version.submission_id == "s2-fix"


def test_a_late_older_session_holds_no_alert() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.submit("s3", 3, 38.0)
    step = c.submit("s2", 2, 30.0)
    assert alerts(step) == [] and one_scored(step, "s2").latest is False


# --- episodes ---------------------------------------------------------------------------------


def september_then_november(c: Client, november: tuple[float, float] = (38.0, 30.0)) -> list[series.Step]:
    """Sessions 1, 2, 3 on Sept 1-3, then 1, 2 on Nov 1-2, none with an episode id."""
    steps = [c.submit(f"sep-{n}", n, 38.0, at=SEPT + timedelta(days=n - 1)) for n in (1, 2, 3)]
    steps += [c.submit(f"nov-{n}", n, t, at=NOV + timedelta(days=n - 1)) for n, t in zip((1, 2), november,
                                                                                            strict=True)]
    return steps


def test_numbering_that_restarts_without_an_episode_id_begins_a_new_derived_episode() -> None:
    c = Client()
    steps = september_then_november(c)
    got = [(o.session.version.submission_id, o.session.episode_id, o.session.episode_derived)
           for s in steps for o in scored(s)]
    assert got == [("sep-1", "auto/2026-09-01/1", True), ("sep-2", "auto/2026-09-01/1", True),
                   ("sep-3", "auto/2026-09-01/1", True), ("nov-1", "auto/2026-11-01/1", True),
                   ("nov-2", "auto/2026-11-01/1", True)]


def test_a_new_episode_overwrites_nothing_of_the_earlier_one() -> None:
    c = Client()
    steps = september_then_november(c)
    assert all(o.session.version.submission_id.startswith("nov") for s in steps[3:] for o in scored(s))
    september = {k: p for k, p in c.state.published.items() if "2026-09-01" in k}
    assert sorted((p.submission_id, p.revision, p.vacant) for p in september.values()) == [
        ("sep-1", 1, False), ("sep-2", 1, False), ("sep-3", 1, False)]


def test_the_first_session_of_a_new_episode_has_no_previous() -> None:
    c = Client()
    steps = september_then_november(c)
    nov1 = one_scored(steps[3], "nov-1")
    assert nov1.session.previous_total is None and nov1.session.change_from_previous is None


def test_a_drop_in_the_new_episode_alerts() -> None:
    c = Client()
    steps = september_then_november(c, (38.0, 30.0))
    (a,) = alerts(steps[-1])
    assert a.alert.alert_id == alert_id(2, "auto/2026-11-01/1") and a.alert.severity == "critical"
    assert a.alert.session.previous_total == 38.0


def test_a_new_episode_supersedes_the_alert_of_the_earlier_one() -> None:
    c = Client()
    c.submit("sep-1", 1, 38.0, at=SEPT)
    c.submit("sep-2", 2, 30.0, at=SEPT + timedelta(days=1))
    step = c.submit("nov-1", 1, 38.0, at=NOV)
    (status,) = statuses(step)
    assert (status.alert_id, status.status) == (alert_id(2), "superseded")


def test_same_number_on_the_same_day_without_episode_id_is_a_correction() -> None:
    c = Client()
    c.submit("a", 1, 38.0, at=SEPT)
    step = c.submit("b", 1, 30.0, at=SEPT + timedelta(hours=3))
    (o,) = scored(step)
    assert o.session.version.submission_id == "b" and o.supersedes == "a" and o.revision == 2
    assert o.session.episode_id == "auto/2026-09-01/1"


def test_same_number_on_another_day_is_another_session_never_an_overwrite() -> None:
    c = Client()
    c.submit("a", 1, 38.0, at=SEPT)
    step = c.submit("b", 1, 30.0, at=SEPT + timedelta(days=1))
    (o,) = scored(step)
    assert o.supersedes is None and o.revision == 1 and o.session.episode_id == "auto/2026-09-02/1"
    assert len(c.state.published) == 2


def test_two_numbers_on_one_day_a_later_lower_number_begins_a_new_episode() -> None:
    c = Client()
    c.submit("a", 2, 38.0, at=SEPT)
    (o,) = scored(c.submit("b", 1, 30.0, at=SEPT + timedelta(hours=3)))
    assert o.session.episode_id == "auto/2026-09-01/1" and o.session.previous_total is None and o.latest


def test_a_date_corrected_under_the_same_id_moves_the_session_to_its_new_episode() -> None:
    c = Client()
    september_then_november(c)  # nov-2 (30.0) alerts in the November episode
    step = c.submit("nov-2", 4, 30.0, at=SEPT + timedelta(days=3))  # it was session 4 on Sept 4
    moved = one_scored(step, "nov-2")
    assert moved.session.episode_id == "auto/2026-09-01/1" and moved.revision == 2
    assert moved.session.previous_total == 38.0
    (status,) = statuses(step)
    assert (status.alert_id, status.status) == (alert_id(2, "auto/2026-11-01/1"), "withdrawn")
    vacated = c.state.published["SRS\x1fauto/2026-11-01/1\x1f2"]
    assert vacated.vacant


def test_a_date_corrected_under_a_new_id_is_another_session_and_the_old_one_stays() -> None:
    c = Client()
    c.submit("a", 1, 38.0, at=SEPT)
    step = c.submit("a-fix", 1, 38.0, at=SEPT + timedelta(days=1))
    (o,) = scored(step)
    assert o.supersedes is None and o.revision == 1
    assert c.state.published["SRS\x1fauto/2026-09-01/1\x1f1"].submission_id == "a"


def test_backfilling_an_older_episode_after_a_newer_one_keeps_the_newer_current() -> None:
    c = Client()
    c.submit("nov-1", 1, 38.0, at=NOV)
    c.submit("nov-2", 2, 30.0, at=NOV + timedelta(days=1))
    c.submit("sep-1", 1, 38.0, at=SEPT)
    step = c.submit("sep-2", 2, 30.0, at=SEPT + timedelta(days=1))
    (o,) = scored(step)
    assert o.session.episode_id == "auto/2026-09-01/1" and o.latest is False
    assert alerts(step) == [] and statuses(step) == []
    assert c.state.alerts[alert_id(2, "auto/2026-11-01/1")].state == "raised"


def test_backfilling_an_older_start_regroups_the_later_sessions_into_its_episode() -> None:
    c = Client()
    c.submit("n3", 3, 38.0, at=NOV)
    c.submit("n4", 4, 30.0, at=NOV + timedelta(days=7))  # alerts in episode auto/2026-11-01/3
    step = c.submit("s1", 1, 38.0, at=SEPT)  # 1 then 3, 4: one episode that began in September
    got = {o.session.version.submission_id: (o.session.episode_id, o.revision) for o in scored(step)}
    assert got == {"s1": ("auto/2026-09-01/1", 1), "n3": ("auto/2026-09-01/1", 2), "n4": ("auto/2026-09-01/1", 2)}
    (raised,), (withdrawn,) = alerts(step), statuses(step)
    assert raised.alert.alert_id == alert_id(4) and raised.revision == 1
    assert (withdrawn.alert_id, withdrawn.status) == (alert_id(4, "auto/2026-11-01/3"), "withdrawn")


def test_a_given_episode_id_orders_its_sessions_by_number_not_by_date() -> None:
    c = Client()
    c.submit("a", 1, 38.0, episode="ep-1", at=SEPT + timedelta(days=5))
    (o,) = scored(c.submit("b", 2, 30.0, episode="ep-1", at=SEPT))
    assert o.session.episode_id == "ep-1" and not o.session.episode_derived
    assert o.session.previous_total == 38.0 and o.latest


def test_the_current_episode_is_that_of_the_most_recently_administered_session() -> None:
    c = Client()
    c.submit("a", 5, 30.0, episode="ep-old", at=SEPT)
    step = c.submit("b", 1, 38.0, episode="ep-new", at=NOV)
    assert one_scored(step, "b").latest
    assert [s.status for s in statuses(step)] == ["superseded"]


def test_episodes_of_groups_by_administration_and_derives_ids() -> None:
    c = Client()
    vs = [c.version(f"s{i}", n, 38.0, at=at) for i, (n, at) in enumerate(
        [(1, SEPT), (2, SEPT + timedelta(days=7)), (1, NOV), (3, NOV + timedelta(days=7)), (7, SEPT)])]
    vs.append(c.version("given", 2, 38.0, episode="ep-x", at=SEPT))
    got = [(eid, derived, [v.submission_id for v in members])
           for eid, derived, members in episodes_of(vs)["SRS"]]
    assert got == [("ep-x", False, ["given"]), ("auto/2026-09-01/1", True, ["s0", "s4"]),
                   ("auto/2026-09-08/2", True, ["s1"]), ("auto/2026-11-01/1", True, ["s2", "s3"])]


def test_derived_episode_id_is_the_utc_date_and_number_of_its_first_session() -> None:
    c = Client()
    late_evening = datetime(2026, 9, 1, 20, 30, tzinfo=timezone(timedelta(hours=-5)))  # Sept 2 01:30 UTC
    assert derived_episode_id(c.version("a", 4, 38.0, at=late_evening)) == "auto/2026-09-02/4"


def test_the_view_does_not_depend_on_the_order_versions_arrive_in() -> None:
    c = Client()
    vs = [c.version("a", 1, 38.0), c.version("b", 2, 30.0), c.version("b-fix", 2, 33.0),
          c.version("c", 1, 34.0, at=NOV), c.version("d", 2, 31.0, at=NOV + timedelta(days=1))]
    views = [derive(p, "north", 0, RULES, TENANT, CLIENT) for p in itertools.permutations(vs)]
    assert all(v == views[0] for v in views)


# --- a corrected time keeps the episode's name ---------------------------------------------------

EVENING = datetime(2026, 9, 1, 23, 30, tzinfo=UTC)  # an evening session in the Americas
FIXED = datetime(2026, 9, 2, 0, 30, tzinfo=UTC)  # its time or offset fixed: the next UTC day


def evening_episode(c: Client) -> list[series.Step]:
    """Sessions 1..3 without episode id, session 1 at 23:30 UTC, session 3 dropping (its alert)."""
    return [c.submit("s1", 1, 38.0, at=EVENING), c.submit("s2", 2, 38.0, at=EVENING + timedelta(days=7)),
            c.submit("s3", 3, 32.0, at=EVENING + timedelta(days=14))]


def shown(c: Client) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """{submission: (episode id, administered at)} and {open alert: its episode}, as the record shows them."""
    view = c.state.view(c.rules)
    sessions = {s.version.submission_id: (s.episode_id, s.version.administered_at.isoformat())
                for s in view.sessions.values()}
    return sessions, {a: r.episode_id for a, r in c.state.alerts.items() if r.state == "raised"}


def test_a_time_of_session_1_corrected_across_midnight_republishes_it_alone_under_the_same_episode() -> None:
    c = Client()
    evening_episode(c)
    step = c.submit("s1", 1, 38.0, at=FIXED)
    (o,) = scored(step)
    assert (o.session.version.submission_id, o.revision) == ("s1", 2)
    assert o.session.episode_id == "auto/2026-09-01/1" and o.session.version.administered_at == FIXED
    assert alerts(step) == [] and statuses(step) == []  # the alert keeps its id, status and raise time
    assert c.state.alerts[alert_id(3)].revision == 1


def test_a_corrected_time_names_the_episode_whichever_version_arrives_first() -> None:
    in_order, reversed_ = Client(), Client()
    old, fixed = in_order.version("s1", 1, 38.0, at=EVENING), in_order.version("s1", 1, 38.0, at=FIXED)
    for c, first, second in ((in_order, old, fixed), (reversed_, fixed, old)):
        c.apply(first)
        c.submit("s2", 2, 38.0, at=EVENING + timedelta(days=7))
        c.submit("s3", 3, 32.0, at=EVENING + timedelta(days=14))
        c.apply(second)
    assert shown(in_order) == shown(reversed_)
    assert shown(in_order)[1] == {alert_id(3): "auto/2026-09-01/1"}
    assert in_order.state.versions["s1"] == reversed_.state.versions["s1"]


def test_the_older_version_arriving_after_its_correction_renames_the_episode_back_to_its_date() -> None:
    c = Client()
    old, fixed = c.version("s1", 1, 38.0, at=EVENING), c.version("s1", 1, 38.0, at=FIXED)
    c.apply(fixed)
    c.submit("s2", 2, 30.0, at=EVENING + timedelta(days=7))  # alerts in auto/2026-09-02/1
    step = c.apply(old)
    assert {(o.session.version.submission_id, o.session.episode_id) for o in scored(step)} == {
        ("s1", "auto/2026-09-01/1"), ("s2", "auto/2026-09-01/1")}
    assert [(s.alert_id, s.status) for s in statuses(step)] == [(alert_id(2, "auto/2026-09-02/1"), "withdrawn")]
    assert [a.alert.alert_id for a in alerts(step)] == [alert_id(2)]


def test_a_version_redelivered_after_its_correction_changes_nothing() -> None:
    c = Client()
    old = c.version("s1", 1, 38.0, at=EVENING)
    c.apply(old)
    c.submit("s2", 2, 38.0, at=EVENING + timedelta(days=7))
    c.submit("s1", 1, 38.0, at=FIXED)
    before = c.state.copy()
    step = c.apply(old)
    assert step.outputs == [] and not step.changed and c.state == before


def test_a_corrected_time_that_moves_session_1_after_session_2_regroups_and_keeps_session_1s_episode() -> None:
    # 2, then 1, 3: a restart of the numbering. Session 1 still begins its episode, which keeps its
    # name, so the alert of session 3 (whose previous total is the same 38.0) is unchanged; session
    # 2 is now an episode of its own, named by its date.
    c = Client()
    evening_episode(c)
    step = c.submit("s1", 1, 38.0, at=EVENING + timedelta(days=8))
    got = {o.session.version.submission_id: (o.session.episode_id, o.revision) for o in scored(step)}
    assert got == {"s1": ("auto/2026-09-01/1", 2), "s2": ("auto/2026-09-08/2", 2)}
    assert alerts(step) == [] and statuses(step) == []
    assert c.state.view(c.rules).sessions[series.slot_key("SRS", "auto/2026-09-01/1", 3)].previous_total == 38.0


def test_a_backfilled_earlier_session_still_regroups_an_episode_whose_first_time_was_corrected() -> None:
    c = Client()
    c.submit("n3", 3, 38.0, at=NOV)
    c.submit("n4", 4, 30.0, at=NOV + timedelta(days=7))
    c.submit("n3", 3, 38.0, at=NOV + timedelta(hours=16))  # a corrected time: still auto/2026-11-01/3
    step = c.submit("s1", 1, 38.0, at=SEPT)  # 1 then 3, 4: one episode that began in September
    assert {o.session.version.submission_id: o.session.episode_id for o in scored(step)} == {
        "s1": "auto/2026-09-01/1", "n3": "auto/2026-09-01/1", "n4": "auto/2026-09-01/1"}
    assert [(s.alert_id, s.status) for s in statuses(step)] == [(alert_id(4, "auto/2026-11-01/3"), "withdrawn")]


def test_a_kept_name_another_episode_begins_on_goes_to_that_episode() -> None:
    # s1 began an episode on Sept 1 and was moved to Sept 20; a new session 1 posted for Sept 1
    # begins its own episode there: it is named by its date, the moved one by its own date.
    c = Client()
    c.submit("s1", 1, 38.0, at=SEPT)
    c.submit("s1", 1, 38.0, at=SEPT + timedelta(days=19))
    c.submit("again", 1, 37.0, at=SEPT)
    c.submit("again-2", 2, 37.0, at=SEPT + timedelta(days=7))
    sessions, _ = shown(c)
    assert sessions["again"][0] == sessions["again-2"][0] == "auto/2026-09-01/1"
    assert sessions["s1"][0] == "auto/2026-09-20/1"


def test_both_forms_of_session_1_corrected_across_midnight_keep_the_alliance_alert_at_risk_unchanged() -> None:
    c = Client()
    for n, (ors, srs) in enumerate(((20.0, 38.0), (20.0, 38.0), (20.0, 32.0)), start=1):
        at = EVENING + timedelta(days=7 * (n - 1))
        c.submit(f"a{n}", n, ors, at=at - timedelta(minutes=50), instrument="ORS")  # one appointment id
        c.submit(f"a{n}", n, srs, at=at)
    raised = c.state.view(c.rules).alerts[alert_id(3)]
    assert raised.outcome_at_risk
    outputs = c.submit("a1", 1, 20.0, at=FIXED - timedelta(minutes=50), instrument="ORS").outputs
    outputs += c.submit("a1", 1, 38.0, at=FIXED).outputs
    assert {(o.session.version.instrument, o.session.episode_id) for o in scored(outputs)} == {
        ("ORS", "auto/2026-09-01/1"), ("SRS", "auto/2026-09-01/1")}
    assert alerts(outputs) == [] and statuses(outputs) == []


def test_a_correction_that_renumbers_session_1_names_its_episode_afresh() -> None:
    # Not a correction of the time alone: it says another session (number 2 on Sept 2).
    c = Client()
    c.submit("s1", 1, 38.0, at=EVENING)
    (o,) = scored(c.submit("s1", 2, 38.0, at=FIXED))
    assert o.session.episode_id == "auto/2026-09-02/2"


def test_a_record_stored_before_names_were_kept_keeps_the_names_it_published() -> None:
    # Before, a record kept only the newest version of a submission: an episode whose first time
    # was corrected was published under the corrected date, and keeps that name.
    c = Client()
    c.submit("s1", 1, 38.0, at=FIXED)  # all such a record holds of s1 (no earliest version)
    c.submit("s2", 2, 38.0, at=EVENING + timedelta(days=7))
    key = ClientKey(TENANT, CLIENT)
    doc = state_doc(key, c.state, 1)
    assert all("og" not in v for v in doc["subs"]), "a submission never corrected stores no earliest version"
    c.state = state_from(key, doc)
    (o,) = scored(c.submit("s3", 3, 32.0, at=EVENING + timedelta(days=14)))
    assert o.session.episode_id == "auto/2026-09-02/1"
    assert [a.alert.alert_id for a in alerts(c.submit("s3", 3, 31.0, at=EVENING + timedelta(days=14)))] == [
        alert_id(3, "auto/2026-09-02/1")]


def test_the_earliest_version_of_a_corrected_submission_is_stored_with_it() -> None:
    c = Client()
    evening_episode(c)
    c.submit("s1", 1, 38.0, at=FIXED)
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, c.state, 1))
    assert back.versions["s1"].origin == c.state.versions["s1"].origin
    assert back.versions["s1"].named_at == EVENING


def test_an_ors_time_of_session_1_corrected_across_midnight_keeps_its_episode_and_outcome_alert() -> None:
    c = Client()
    for n in (1, 2, 3):  # not on track at session 3: an outcome alert
        c.submit(f"o{n}", n, 20.0, at=EVENING + timedelta(days=7 * (n - 1)), instrument="ORS")
    step = c.submit("o1", 1, 20.0, at=FIXED, instrument="ORS")
    (o,) = scored(step)
    assert o.session.episode_id == "auto/2026-09-01/1" and o.revision == 2
    assert alerts(step) == [] and statuses(step) == []


# --- the session gap --------------------------------------------------------------------------


def test_a_session_far_above_the_highest_of_its_episode_is_rejected_as_a_session_gap() -> None:
    c = Client()
    c.feed(38.0, 38.0, 38.0)
    step = c.submit("typo", 100000, 30.0, at=SEPT + timedelta(days=3))
    assert step.outputs == []
    assert step.rejection is not None and step.rejection.reason == "session_gap"
    assert "100000" in step.rejection.detail and "typo" not in c.state.versions


def test_after_a_session_gap_rejection_a_drop_in_the_next_session_still_alerts() -> None:
    c = Client()
    c.feed(38.0, 38.0, 38.0)
    c.submit("typo", 100000, 30.0, at=SEPT + timedelta(days=3))
    step = c.submit("s4", 4, 12.0)
    (a,) = alerts(step)
    assert a.alert.alert_id == alert_id(4) and a.alert.session.previous_total == 38.0


def test_the_first_session_may_have_any_number() -> None:
    c = Client()
    step = c.submit("big", 100000, 38.0, at=SEPT)
    assert step.rejection is None and one_scored(step, "big").session.episode_id == "auto/2026-09-01/100000"


def test_a_session_exactly_the_gap_above_is_accepted_one_more_is_not() -> None:
    c = Client()
    c.feed(38.0)
    assert c.submit("ok", 21, 38.0).rejection is None
    rejected = c.submit("far", 42, 38.0)
    assert rejected.rejection is not None and rejected.rejection.reason == "session_gap"


def test_a_tenants_own_session_gap_applies() -> None:
    c = Client(rules=TenantRules(session_gap=5))
    c.feed(38.0)
    rejected = c.submit("far", 7, 38.0)
    assert rejected.rejection is not None and rejected.rejection.reason == "session_gap"
    assert "5" in rejected.rejection.detail
    assert c.submit("near", 6, 38.0).rejection is None


def test_correcting_an_existing_session_is_never_a_gap() -> None:
    c = Client(rules=TenantRules(session_gap=1))
    c.submit("a", 1, 38.0)
    c.submit("b", 2, 38.0)
    assert c.submit("a", 1, 30.0).rejection is None


def test_a_new_session_beyond_the_episode_cap_is_refused_as_series_full() -> None:
    c = Client(rules=TenantRules(max_episode_sessions=3))
    c.feed(38.0, 38.0, 38.0)
    step = c.submit("s4", 4, 12.0)
    assert step.outputs == [] and step.rejection is not None and step.rejection.reason == "series_full"
    assert "max_episode_sessions 3" in step.rejection.detail and "s4" not in c.state.versions


def test_a_full_episode_still_takes_corrections_of_its_sessions() -> None:
    c = Client(rules=TenantRules(max_episode_sessions=3))
    c.feed(38.0, 38.0, 38.0)
    step = c.submit("s3", 3, 30.0)
    assert step.rejection is None and alerts(step)


def test_a_full_episode_does_not_stop_a_new_episode() -> None:
    c = Client(rules=TenantRules(max_episode_sessions=3))
    c.feed(38.0, 38.0, 38.0)
    step = c.submit("new-1", 1, 38.0, at=NOV)
    assert step.rejection is None and one_scored(step, "new-1").session.episode_id == "auto/2026-11-01/1"


def test_a_new_submission_once_the_client_holds_the_cap_is_refused_as_series_full_and_not_kept() -> None:
    c = Client(rules=TenantRules(max_client_submissions=3))
    c.feed(38.0, 38.0)
    c.submit("typo", 100000, 30.0, at=SEPT + timedelta(days=3))  # a refusal is kept: it counts
    step = c.submit("s3", 3, 12.0)
    assert step.rejection is not None and step.rejection.reason == "series_full"
    assert "max_client_submissions 3" in step.rejection.detail
    assert "s3" not in c.state.versions and "s3" not in c.state.rejected and not step.changed


def test_a_full_client_still_takes_a_correction_under_a_known_submission_id() -> None:
    c = Client(rules=TenantRules(max_client_submissions=2))
    c.feed(38.0, 38.0)
    step = c.submit("s2", 2, 30.0)
    assert step.rejection is None and alerts(step)


def test_a_series_full_refusal_redelivered_is_refused_again() -> None:
    c = Client(rules=TenantRules(max_client_submissions=1))
    c.feed(38.0)
    late = c.version("s2", 2, 30.0)
    assert c.apply(late).rejection == c.apply(late).rejection is not None


def test_a_rejected_version_redelivered_gets_the_same_rejection_though_the_state_changed() -> None:
    c = Client()
    c.feed(38.0)
    typo = c.version("typo", 30, 38.0, at=SEPT + timedelta(days=2))
    first = c.apply(typo)
    for n in range(2, 12):  # the episode grows: 30 would no longer be a gap
        c.submit(f"s{n}", n, 38.0)
    again = c.apply(typo)
    assert again.rejection == first.rejection and again.outputs == [] and not again.changed


def test_a_fixed_number_resubmitted_under_the_rejected_id_is_accepted() -> None:
    c = Client()
    c.feed(38.0)
    c.submit("typo", 100, 38.0)
    step = c.submit("typo", 2, 30.0)
    fixed = one_scored(step, "typo")
    assert step.rejection is None and fixed.session.version.session_number == 2 and fixed.revision == 1
    assert len(alerts(step)) == 1


def test_an_unscorable_submission_is_rejected_and_not_stored() -> None:
    c = Client()
    step = c.submit("none", 1, None)
    assert step.rejection is not None and step.rejection.reason == "unscorable"
    assert c.state.versions == {} and step.outputs == []


# --- site ownership and transfers -------------------------------------------------------------


def test_the_client_belongs_to_the_site_of_its_first_accepted_session() -> None:
    c = Client()
    c.submit("s1", 1, 38.0, site="north")
    assert c.state.owner == "north"


def test_a_submission_of_another_site_is_refused_as_site_conflict_and_changes_nothing() -> None:
    c = Client()
    c.feed(38.0)
    before = c.state.copy()
    step = c.submit("s2", 2, 30.0, site="south")
    assert step.outputs == [] and step.rejection is not None and step.rejection.reason == "site_conflict"
    assert "north" in step.rejection.detail
    assert (c.state.versions, c.state.published, c.state.alerts, c.state.owner) == (
        before.versions, before.published, before.alerts, before.owner)


def test_a_correction_from_another_site_is_refused_too() -> None:
    c = Client()
    c.feed(38.0)
    step = c.submit("s1", 1, 30.0, site="south")
    assert step.rejection is not None and step.rejection.reason == "site_conflict"
    assert c.state.versions["s1"].total == 38.0


def test_a_young_childs_form_from_another_site_is_refused_too() -> None:
    c = Client()
    c.feed(38.0)
    step = c.submit("kid", 1, 20.0, site="south", instrument="YCSRS")
    assert step.rejection is not None and step.rejection.reason == "site_conflict"
    assert "kid" not in c.state.versions


def test_a_transfer_republishes_every_current_session_with_the_new_site_and_site_version() -> None:
    c = Client()
    september_then_november(c, (38.0, 37.0))
    step = c.transfer("tx-1", "south")
    got = sorted((o.session.version.submission_id, o.session.site_id, o.session.site_version, o.revision)
                 for o in scored(step))
    assert got == [(f"{m}-{n}", "south", 1, 2) for m, ns in (("nov", (1, 2)), ("sep", (1, 2, 3))) for n in ns]
    event = handlers.scored_event(TENANT, CLIENT, scored(step)[0])
    assert (event.site_id, event.site_version) == ("south", 1)


def test_after_a_transfer_the_new_sites_submissions_are_accepted_and_the_old_sites_refused() -> None:
    c = Client()
    c.feed(38.0)
    c.transfer("tx-1", "south")
    accepted = c.submit("s2", 2, 38.0, site="south")
    assert accepted.rejection is None and one_scored(accepted, "s2").session.site_id == "south"
    refused = c.submit("s3", 3, 38.0, site="north")
    assert refused.rejection is not None and refused.rejection.reason == "site_conflict"


def test_a_transfer_redelivered_is_a_no_op() -> None:
    c = Client()
    c.feed(38.0)
    c.transfer("tx-1", "south")
    before = c.state.copy()
    again = c.transfer("tx-1", "south")
    assert again.redelivered and again.outputs == [] and not again.changed
    assert (c.state.site_version, c.state.published) == (before.site_version, before.published)


def test_a_transfer_back_and_forth_counts_site_versions() -> None:
    c = Client()
    c.feed(38.0)
    c.transfer("tx-1", "south")
    (o,) = scored(c.transfer("tx-2", "north"))
    assert (o.session.site_id, o.session.site_version, o.revision) == ("north", 2, 3)


def test_a_transfer_to_the_owning_site_publishes_nothing() -> None:
    c = Client()
    c.feed(38.0)
    step = c.transfer("tx-1", "north")
    assert step.outputs == [] and c.state.site_version == 0


def test_an_open_alert_stays_with_its_site_and_is_not_raised_again_by_a_transfer() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.transfer("tx-1", "south")
    assert alerts(step) == [] and statuses(step) == []
    (a,) = alerts(c.state.current_outputs(c.rules))
    assert a.alert.site_id == "north" and a.revision == 1


def test_a_session_after_a_transfer_alerts_for_the_new_site() -> None:
    c = Client()
    c.feed(38.0)
    c.transfer("tx-1", "south")
    (a,) = alerts(c.submit("s2", 2, 30.0, site="south"))
    assert a.alert.site_id == "south"


def test_a_correction_from_the_new_site_revises_the_open_alert_for_the_new_site_and_its_clinician() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    c.transfer("tx-1", "south")
    (a,) = alerts(c.submit("s2", 2, 28.0, site="south", clinician="c-south"))
    assert (a.alert.site_id, a.alert.session.version.clinician_id, a.revision) == ("south", "c-south", 2)
    assert c.state.alerts[a.alert.alert_id].site_id == "south"


def test_an_alert_raised_for_the_new_site_is_what_the_record_shows_and_re_emits() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    c.transfer("tx-1", "south")
    (a,) = alerts(c.submit("s2", 2, 28.0, site="south", clinician="c-south"))
    kept = alerts(c.state.current_outputs(c.rules))
    c.state.cached = None  # derived afresh from the record, as after a restart
    assert alerts(c.state.current_outputs(c.rules)) == kept == [a]
    assert alerts(c.submit("s3", 3, 38.0, site="south")) == []  # and it is not raised again


def test_the_new_sites_outcome_form_making_an_open_alert_at_risk_raises_it_for_the_new_site() -> None:
    c = Client()
    c.submit("o1", 1, 20.0, at=SEPT - timedelta(minutes=50), instrument="ORS")
    c.submit("s1", 1, 38.0, at=SEPT)
    c.submit("s2", 2, 30.0, at=SEPT + timedelta(days=7))
    c.transfer("tx-1", "south")
    step = c.submit("o2", 2, 13.0, at=SEPT + timedelta(days=7, minutes=-50), instrument="ORS", site="south",
                    clinician="c-south")
    got = {(a.alert.session.version.instrument, a.alert.site_id, a.alert.outcome_at_risk, a.revision)
           for a in alerts(step)}
    assert got == {("ORS", "south", False, 1), ("SRS", "south", True, 2)}


def test_an_open_alert_stays_with_its_site_through_a_transfer_there_and_back() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    there, back = c.transfer("tx-1", "south"), c.transfer("tx-2", "north")
    assert alerts(there) == alerts(back) == []
    (a,) = alerts(c.state.current_outputs(c.rules))
    assert (a.alert.site_id, a.revision) == ("north", 1)


def test_an_old_sites_session_first_alerting_after_a_transfer_alerts_for_the_new_site() -> None:
    c = Client()
    c.feed(37.0, 37.0)  # no alert under the cutoff of 36
    c.rules = replace(RULES, cutoff=38.0)  # applied with the transfer, the next record scoring applies
    (a,) = alerts(c.transfer("tx-1", "south"))
    assert (a.alert.site_id, a.alert.session.version.site_id) == ("south", "north")


@pytest.mark.parametrize(("owner", "raised_for", "site"), [
    ("north", "north", "north"),  # no transfer: the one site
    ("south", "north", "south"),  # raised after a transfer: the new site
    (None, "north", "north"),  # no owner yet (the record's first session names it)
])
def test_a_raised_revision_goes_to_the_owning_site(owner: str | None, raised_for: str, site: str) -> None:
    assert series.revision_site(owner, raised_for) == site


def test_a_rejection_from_before_a_transfer_is_given_again_when_redelivered_after_it() -> None:
    c = Client()
    c.feed(38.0)
    from_south = c.version("s2", 2, 38.0, site="south")
    first = c.apply(from_south)
    c.transfer("tx-1", "south")
    again = c.apply(from_south)
    assert again.rejection == first.rejection and again.outputs == []


# --- a transfer racing the ORS: judged by acceptance time (docs/clinical-records.md) -----------

T1 = ACCEPTED + timedelta(minutes=10)
T2 = ACCEPTED + timedelta(minutes=20)
SECOND = timedelta(seconds=1)


def handover(at: datetime, from_site: str | None, to_site: str) -> series.Handover:
    return series.Handover(at, from_site, to_site, f"tx-{to_site}-{at.isoformat()}")


TWO_TRANSFERS = [handover(T1, "north", "south"), handover(T2, "south", "west")]


@pytest.mark.parametrize(("handovers", "at", "owner"), [
    ([], T1, "west"),  # no transfer: the owner now
    ([handover(T1, "north", "south")], T1 - SECOND, "north"),
    ([handover(T1, "north", "south")], T1, "south"),  # a transfer takes effect at its acceptance instant
    ([handover(T1, "north", "south")], T1 + SECOND, "south"),
    ([handover(T1, None, "south")], T1 - SECOND, None),  # before the first session named a site
    (TWO_TRANSFERS, T1 - SECOND, "north"),
    (TWO_TRANSFERS, T1, "south"),
    (TWO_TRANSFERS, T2 - SECOND, "south"),
    (TWO_TRANSFERS, T2, "west"),
    (TWO_TRANSFERS, T2 + SECOND, "west"),
])
def test_the_owner_at_an_acceptance_time_is_the_site_the_transfers_up_to_then_left_it_with(
        handovers: list[series.Handover], at: datetime, owner: str | None) -> None:
    now = handovers[-1].to_site if handovers else "west"
    assert series.owner_at(handovers, now, at) == owner


def test_the_owner_at_a_time_given_in_another_offset_is_the_same() -> None:
    east = timezone(timedelta(hours=2))
    assert series.owner_at([handover(T1, "north", "south")], "south", T1.astimezone(east)) == "south"
    assert series.owner_at([handover(T1, "north", "south")], "south", (T1 - SECOND).astimezone(east)) == "north"


@pytest.mark.parametrize(("site", "owner", "allowed"), [
    ("north", None, True), ("north", "north", True), ("south", "north", False)])
def test_a_version_may_change_the_record_only_when_its_site_owned_the_client(
        site: str, owner: str | None, allowed: bool) -> None:
    assert series.site_allowed(site, owner) is allowed


def ors_version(sid: str, n: int, at: datetime, site: str, total: float = 25.0) -> Version:
    return Version(sid, "ORS", None, n, SEPT + timedelta(days=7 * (n - 1)), site, f"c-{site}", None, total, at)


def refusal(v: Version, kept: bool = True) -> series.Rejection:
    return series.Rejection(v.accepted_at, v.digest, "site_conflict", "another site", v if kept else None)


@pytest.mark.parametrize(("instrument", "reason", "at", "kept"), [
    ("ORS", "site_conflict", T2, True),
    ("YCORS", "site_conflict", T2 + SECOND, True),
    ("ORS", "site_conflict", T2 - SECOND, True),  # before the newest transfer: one before it may be read late
    ("SRS", "site_conflict", T2, False),  # shares the transfer's partition: judged in order already
    ("ORS", "session_gap", T2, False),  # no transfer changes that
])
def test_only_an_outcome_forms_site_conflict_keeps_its_content(
        instrument: str, reason: series.RejectReason, at: datetime, kept: bool) -> None:
    v = replace(ors_version("o1", 1, at, "south"), instrument=instrument)
    assert series.keeps_content(v, reason) is kept


def test_a_transfer_re_judges_the_kept_refusals_its_site_owned_at_their_acceptance_oldest_first() -> None:
    hs = [handover(T1, "north", "south")]
    later, at_it, before = (ors_version("a", 2, T1 + SECOND, "south"), ors_version("b", 3, T1, "south"),
                            ors_version("c", 4, T1 - SECOND, "south"))
    old_site = ors_version("d", 5, T1 + SECOND, "north")
    rejected = {v.key: refusal(v) for v in (later, at_it, before, old_site)}
    rejected["gone"] = refusal(ors_version("e", 6, T1 + SECOND, "south"), kept=False)
    assert series.to_rejudge(rejected, hs, "south") == [at_it, later]


def test_past_the_bound_the_oldest_kept_contents_are_dropped() -> None:
    kept = [ors_version(f"o{i}", i + 2, T1 + i * SECOND, "west") for i in range(4)]
    rejected = {v.key: refusal(v) for v in kept}
    assert series.contents_to_drop(rejected, bound=4) == []
    assert series.contents_to_drop(rejected, bound=2) == sorted([kept[0].key, kept[1].key])
    rejected[kept[0].key] = refusal(kept[0], kept=False)
    assert series.contents_to_drop(rejected, bound=2) == [kept[1].key]


def race(c: Client, v: Version, read_first: bool, at: datetime = T1, site: str = "south") -> list[series.Output]:
    """`v` (an ORS) and a transfer to `site` accepted `at`, applied in the given read order; what
    both published."""
    def move() -> series.Step:
        return c.state.transfer("tx-1", site, c.rules, c.now(), at)
    first, second = (lambda: c.apply(v), move) if read_first else (move, lambda: c.apply(v))
    return first().outputs + second().outputs


def final_record(c: Client) -> tuple[object, ...]:
    """What the record shows and refuses, without the times things were decided."""
    shown = sorted((o.session.version.submission_id, o.session.site_id, o.session.site_version, o.session.total)
                   for o in scored(c.state.current_outputs(c.rules)))
    return tuple(shown), tuple(sorted(c.state.rejected)), tuple(sorted(c.state.versions)), c.state.owner


@pytest.mark.parametrize(("site", "at"), [
    ("south", T1 + SECOND),  # the new site's, after the transfer
    ("south", T1),  # the new site's, at the transfer's very instant
    ("south", T1 - SECOND),  # the new site's, before the transfer: refused either way
    ("north", T1 - SECOND),  # the old site's, before the transfer: taken either way
])
def test_whether_an_ors_is_taken_does_not_depend_on_whether_the_transfer_was_read_first(
        site: str, at: datetime) -> None:
    records = []
    for read_first in (True, False):
        c = Client()
        c.submit("s1", 1, 38.0)
        race(c, ors_version("o1", 1, at, site), read_first)
        records.append(final_record(c))
    assert records[0] == records[1]


def test_the_new_sites_ors_read_before_the_transfer_is_refused_then_scored_by_it_for_the_new_site() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    v = ors_version("o1", 1, T1 + SECOND, "south")
    refused = c.apply(v)
    assert refused.rejection is not None and refused.rejection.reason == "site_conflict"
    assert c.state.rejected[v.key].version == v  # its content kept, to be re-judged
    step = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    o = one_scored(step, "o1")
    assert (o.session.site_id, o.session.site_version, o.revision) == ("south", 1, 1)
    assert step.taken == (v,) and v.key not in c.state.rejected and c.state.versions[v.key] == v
    assert c.state.handovers[-1].taken == (v.key,)


def test_the_new_sites_ors_scored_by_the_transfer_alerts_for_the_new_site() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.apply(ors_version("o1", 1, T1 + SECOND, "south", total=20.0))
    c.apply(ors_version("o2", 2, T1 + 2 * SECOND, "south", total=10.0))  # deteriorated: an outcome alert
    step = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    assert {(a.alert.session.version.submission_id, a.alert.site_id, a.revision) for a in alerts(step)} == {
        ("o2", "south", 1)}


def test_the_old_sites_ors_read_after_the_transfer_is_scored_for_the_site_that_owns_the_client_now() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    step = c.apply(ors_version("o1", 1, T1 - SECOND, "north"))
    o = one_scored(step, "o1")
    assert step.rejection is None and (o.session.site_id, o.session.site_version, o.revision) == ("south", 1, 1)


def taken_by_a_transfer() -> tuple[Client, Version]:
    """A client whose new site's ORS, read before the transfer, the transfer (tx-1) took."""
    c = Client()
    c.submit("s1", 1, 38.0)
    v = ors_version("o1", 1, T1 + SECOND, "south")
    c.apply(v)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    return c, v


def test_an_ors_redelivered_after_the_transfer_took_it_changes_nothing() -> None:
    c, v = taken_by_a_transfer()
    before = c.state.copy()
    again = c.apply(v)
    assert again.redelivered and again.rejection is None and again.outputs == []
    assert c.state.published == before.published


def test_a_redelivered_transfer_names_the_versions_it_took_and_publishes_nothing_new() -> None:
    c, v = taken_by_a_transfer()
    again = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    assert again.redelivered and again.outputs == [] and again.taken == (v,)


def refused_before_its_transfer(*kept: Version) -> Client:
    """A client of north (session 1 of each scale) whose versions `kept`, read before the transfer
    to south accepted at T1, were refused site_conflict (their content kept to be re-judged)."""
    c = Client()
    c.submit("s1", 1, 38.0)
    c.apply(ors_version("o1", 1, T1 - SECOND, "north"))
    for v in kept:
        refused = c.apply(v).rejection
        assert refused is not None and refused.reason == "site_conflict"
    return c


GAP = ors_version("o30", 30, T1 + SECOND, "south")  # 29 above its episode's highest (o1): a session gap


def test_the_new_sites_ors_its_transfer_re_judges_into_a_session_gap_is_refused_so_at_the_next_judgement() -> None:
    c = refused_before_its_transfer(GAP)
    now = c.now()
    step = c.state.transfer("tx-1", "south", c.rules, now, T1)
    (refused,) = step.refused
    assert (refused.version, refused.rejection.reason, refused.rejection.judgement, refused.at) == (
        GAP, "session_gap", 1, now)
    assert "30" in refused.rejection.detail and GAP.key not in c.state.versions
    assert c.state.rejected[GAP.key] == refused.rejection and refused.rejection.version is None  # final now
    assert c.state.handovers[-1].refused == (refused,)


def test_a_redelivery_of_the_transfers_applying_copy_names_the_same_refusal_and_the_other_copy_none() -> None:
    c = refused_before_its_transfer(GAP)
    first = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    again = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    assert again.redelivered and again.refused == first.refused and again.outputs == []
    assert c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=True) == series.Step()


def test_the_refused_ors_redelivered_after_its_re_judging_gets_the_new_refusal() -> None:
    c = refused_before_its_transfer(GAP)
    (refused,) = c.state.transfer("tx-1", "south", c.rules, c.now(), T1).refused
    assert c.apply(GAP).rejection == refused.rejection


def test_the_second_of_two_identical_orses_a_transfer_re_judges_is_refused_duplicate_at_the_next_judgement() -> None:
    first, second = ors_version("o2", 2, T1 + SECOND, "south"), ors_version("o2b", 2, T1 + 2 * SECOND, "south")
    c = refused_before_its_transfer(first, second)
    step = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    assert [(r.version, r.rejection.reason, r.rejection.judgement) for r in step.refused] == [
        (second, "duplicate", 1)]
    assert "'o2'" in step.refused[0].rejection.detail and first.key in c.state.versions


def test_an_ors_a_transfer_re_judges_into_a_full_record_is_refused_series_full_in_place_of_its_site_conflict(
        ) -> None:
    c = refused_before_its_transfer(GAP)  # s1, o1 and the refusal: 3 submissions
    full = replace(c.rules, max_client_submissions=2)  # lowered since: the record is full without it
    step = c.state.transfer("tx-1", "south", full, c.now(), T1)
    (refused,) = step.refused
    assert (refused.rejection.reason, refused.rejection.judgement) == ("series_full", 1)
    assert c.state.rejected[GAP.key] == refused.rejection and len(c.state.rejected) == 1


def test_a_transfer_read_late_that_leaves_the_owner_tells_the_new_reason_of_a_refusal_it_re_judges() -> None:
    c = refused_before_its_transfer()
    c.state.transfer("tx-2", "west", c.rules, c.now(), T2)  # accepted last, read first
    c.apply(GAP)  # south's, accepted between the two: refused, the timeline holding the later alone
    step = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)  # read late: placed before tx-2
    (refused,) = step.refused
    assert (refused.version, refused.rejection.reason, refused.rejection.judgement) == (GAP, "session_gap", 1)
    assert c.state.owner == "west" and c.state.rejected[GAP.key] == refused.rejection
    assert {h.event_id: h.refused for h in c.state.handovers} == {"tx-1": (refused,), "tx-2": ()}


def test_a_refusal_re_judged_by_a_transfer_is_stored_and_read_back() -> None:
    c = refused_before_its_transfer(GAP)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    key = ClientKey(TENANT, CLIENT)
    loaded = state_from(key, state_doc(key, c.state, c.state.version))
    assert loaded.handovers == c.state.handovers and loaded.rejected == c.state.rejected
    assert loaded.rejected[GAP.key].judgement == 1


def test_through_two_transfers_each_ors_is_judged_against_the_site_of_its_acceptance() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    between = ors_version("o1", 1, T1 + SECOND, "south")  # south owned it then
    before_both = ors_version("o2", 2, T1 - SECOND, "south")  # north owned it then
    for v in (between, before_both):
        c.apply(v)  # both read before either transfer: refused
    first = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    second = c.state.transfer("tx-2", "north", c.rules, c.now(), T2)
    assert first.taken == (between,) and second.taken == ()
    assert between.key in c.state.versions and before_both.key in c.state.rejected


def test_past_the_bound_the_oldest_refusal_loses_its_content_and_stays_refused() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    vs = [ors_version(f"o{i}", i, T1 + i * SECOND, "south") for i in range(1, series.MAX_KEPT_REFUSALS + 2)]
    for v in vs:
        c.apply(v)
    assert [k for k, r in c.state.rejected.items() if r.version is None] == [vs[0].key]
    step = c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    assert step.taken == tuple(vs[1:])
    assert list(c.state.rejected) == [vs[0].key] and c.state.rejected[vs[0].key].reason == "site_conflict"


def test_the_old_sites_ors_accepted_after_the_transfer_but_read_before_it_is_refused() -> None:
    # Read before the transfer's copy on srs.submitted.v1 (that consumer lagging), but after its copy
    # on ors.submitted.v1, which precedes the ORS in the client's partition of that topic.
    c = Client()
    c.submit("s1", 1, 38.0)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=True)
    c.apply(ors_version("o1", 1, T1 + SECOND, "north"))
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    key = record_key("o1", "ORS")
    assert key not in c.state.versions and c.state.rejected[key].reason == "site_conflict"


@pytest.mark.parametrize("outcome_first", [True, False], ids=["ors copy first", "srs copy first"])
def test_the_transfers_other_copy_changes_nothing_and_publishes_nothing(outcome_first: bool) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.apply(ors_version("o1", 1, T1 + SECOND, "south"))  # refused, kept: the first copy takes it
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=outcome_first)
    before = c.state.copy()
    second = c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=not outcome_first)
    assert second == series.Step()  # not even a redelivery: nothing re-emitted, nothing to write
    assert c.state == before


@pytest.mark.parametrize("outcome_first", [True, False], ids=["ors copy first", "srs copy first"])
def test_a_redelivery_of_the_copy_that_applied_the_transfer_still_re_emits_and_names_what_it_took(
        outcome_first: bool) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    v = ors_version("o1", 1, T1 + SECOND, "south")
    c.apply(v)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=outcome_first)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=not outcome_first)
    again = c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=outcome_first)
    assert again.redelivered and again.outputs == [] and again.taken == (v,)
    assert c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=not outcome_first) == series.Step()


def test_which_copy_applied_a_transfer_is_stored_and_read_back() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1, outcome_copy=True)
    c.state.transfer("tx-2", "north", c.rules, c.now(), T2)
    key = ClientKey(TENANT, CLIENT)
    loaded = state_from(key, state_doc(key, c.state, c.state.version))
    assert (loaded.transfers, loaded.outcome_copies) == (["tx-1", "tx-2"], ["tx-1"])


def test_kept_refusals_and_the_ownership_timeline_are_stored_and_read_back() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    c.apply(ors_version("o1", 1, T1 + SECOND, "south"))
    c.apply(ors_version("o2", 2, T2 + SECOND, "west"))
    c.state.transfer("tx-1", "south", c.rules, c.now(), T1)
    key = ClientKey(TENANT, CLIENT)
    loaded = state_from(key, state_doc(key, c.state, c.state.version))
    assert loaded.handovers == c.state.handovers and loaded.rejected == c.state.rejected
    assert loaded.rejected[record_key("o2", "ORS")].version is not None


# --- two transfers read in reverse acceptance order (docs/clinical-records.md) -----------------

# Two admin transfers of one client, north to south accepted at T1 (A) and on to west at T2 (B):
# intake stamps `accepted_at` before it publishes, so B's copies may precede A's in the partitions.
A, B = ("tx-a", "south", T1), ("tx-b", "west", T2)
Copy = tuple[str, str, datetime, bool]  # a transfer's event id, site, acceptance, read on ors.submitted.v1


def transferred(c: Client, *copies: Copy) -> list[series.Step]:
    return [c.state.transfer(eid, site, c.rules, c.now(), at, outcome_copy=ors_copy)
            for eid, site, at, ors_copy in copies]


def timeline(c: Client) -> list[tuple[datetime, str | None, str, str]]:
    """The ownership timeline, without which transfer re-judged what (that depends on the order)."""
    return [(h.accepted_at, h.from_site, h.to_site, h.event_id) for h in c.state.handovers]


IN_ORDER, REVERSED = [(*A, False), (*B, False)], [(*B, False), (*A, False)]
BOTH_ORDERS = pytest.mark.parametrize("order", [IN_ORDER, REVERSED], ids=["in acceptance order", "reversed"])


@BOTH_ORDERS
def test_the_transfer_accepted_last_decides_the_owner_whichever_is_read_first(order: list[Copy]) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    transferred(c, *order)
    assert c.state.owner == "west"


@BOTH_ORDERS
def test_the_ownership_timeline_holds_the_transfers_in_acceptance_order_whichever_is_read_first(
        order: list[Copy]) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    transferred(c, *order)
    assert timeline(c) == [(T1, "north", "south", "tx-a"), (T2, "south", "west", "tx-b")]


@BOTH_ORDERS
@pytest.mark.parametrize(("site", "taken"), [("south", True), ("north", False), ("west", False)])
def test_a_version_accepted_between_two_transfers_read_after_both_is_judged_against_the_first_ones_site(
        order: list[Copy], site: str, taken: bool) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    transferred(c, *order)
    step = c.apply(ors_version("o1", 1, T1 + SECOND, site))
    assert (step.rejection is None) is taken


def test_an_earlier_transfer_read_late_takes_the_new_sites_kept_refusal_it_now_allows() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    v = ors_version("o1", 1, T1 + SECOND, "south")
    transferred(c, (*B, False))
    assert c.apply(v).rejection is not None  # north owned it then, as far as scoring knew
    (late,) = transferred(c, (*A, False))
    o = one_scored(late, "o1")
    assert late.taken == (v,) and (o.session.site_id, o.session.site_version) == ("west", 1)
    assert [h.taken for h in c.state.handovers] == [(v.key,), ()]


def test_an_earlier_transfer_read_late_republishes_nothing_and_keeps_the_site_version() -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    transferred(c, (*B, False))
    (late,) = transferred(c, (*A, False))
    assert late.outputs == [] and late.changed and c.state.site_version == 1


def test_a_transfer_to_the_site_that_owns_the_client_still_holds_its_place_in_the_timeline() -> None:
    # Read in order it changes nothing; an earlier transfer read after it must not outlast it.
    c = Client()
    c.submit("s1", 1, 38.0)
    transferred(c, ("tx-c", "north", T2, False), (*A, False))
    assert c.state.owner == "north"
    assert timeline(c) == [(T1, "north", "south", "tx-a"), (T2, "south", "north", "tx-c")]


@pytest.mark.parametrize("reverse", [False, True], ids=["in event id order", "reversed"])
def test_two_transfers_accepted_at_the_same_instant_are_ordered_by_event_id(reverse: bool) -> None:
    c = Client()
    c.submit("s1", 1, 38.0)
    copies: list[Copy] = [("tx-1", "south", T1, False), ("tx-2", "west", T1, False)]
    transferred(c, *(reversed(copies) if reverse else copies))
    assert c.state.owner == "west" and [h.event_id for h in c.state.handovers] == ["tx-1", "tx-2"]


def reporting_owner(c: Client, outputs: list[series.Output]) -> str | None:
    """The client's site as reporting derives it from every scored SRS event it was sent."""
    events = [handlers.scored_event(TENANT, CLIENT, o) for o in scored(outputs) if not o.session.version.outcome]
    doc = reporting.merge(None, events).doc
    assert doc is not None
    return str(doc["site_id"])


BETWEEN = {"south": ors_version("o1", 1, T1 + SECOND, "south"), "west": ors_version("o1", 1, T1 + SECOND, "west")}
FOUR_COPIES: list[Copy] = [(*A, False), (*A, True), (*B, False), (*B, True)]


@pytest.mark.parametrize("site", sorted(BETWEEN))
def test_every_read_order_of_two_transfers_four_copies_and_an_ors_between_them_ends_alike(site: str) -> None:
    """Whatever order the copies of A and B and an ORS accepted between them (south's: taken; west's:
    refused) are read in, the owner, the timeline, what is shown and refused are the same, and
    reporting ends with the owner scoring has."""
    ends = set()
    for order in itertools.permutations([*FOUR_COPIES, None]):
        c = Client()
        outputs = c.submit("s1", 1, 38.0).outputs
        for copy in order:
            step = c.apply(BETWEEN[site]) if copy is None else transferred(c, copy)[0]
            outputs += step.outputs
        shown = sorted((o.session.version.submission_id, o.session.site_id)
                       for o in scored(c.state.current_outputs(c.rules)))
        ends.add((c.state.owner, tuple(timeline(c)), tuple(shown), tuple(sorted(c.state.rejected)),
                  reporting_owner(c, outputs)))
    (end,) = ends
    owner, _, shown, rejected, seen_by_reporting = end
    assert owner == seen_by_reporting == "west"
    taken = site == "south"
    assert (("o1", "west") in shown, rejected) == (taken, () if taken else (record_key("o1", "ORS"),))


# --- young children's forms -------------------------------------------------------------------


def test_a_young_childs_form_is_stored_and_never_scored() -> None:
    c = Client()
    step = c.submit("kid", 1, 10.0, instrument="YCSRS")
    assert step.audited and step.changed and step.outputs == [] and "kid" in c.state.versions
    assert c.state.current_outputs(c.rules) == []


def test_a_scored_session_corrected_into_a_young_childs_form_withdraws_its_alert() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    step = c.submit("s2", 2, 30.0, instrument="YCSRS")
    assert step.audited and [(o.alert_id, o.status) for o in statuses(step)] == [(alert_id(2), "withdrawn")]


def test_a_scored_session_corrected_into_a_young_childs_form_hands_its_session_to_an_identical_resend() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    c.submit("s2-again", 2, 30.0)  # duplicate: kept, not shown
    step = c.submit("s2", 2, 30.0, instrument="YCSRS")
    (o,) = scored(step)
    assert (o.session.version.submission_id, o.supersedes, o.revision) == ("s2-again", "s2", 2)
    nxt = c.submit("s3", 3, 38.0)  # and the next record publishes only itself
    assert [o.session.version.submission_id for o in scored(nxt)] == ["s3"]


def test_a_young_childs_form_without_a_total_is_still_stored() -> None:
    c = Client()
    step = c.submit("kid", 1, None, instrument="YCSRS")
    assert step.audited and step.rejection is None and "kid" in c.state.versions


def test_other_instruments_are_separate_series_with_their_own_rules() -> None:
    c = Client(rules=TenantRules(instruments={"CSRS": R.InstrumentOverride(cutoff=32.0)}))
    c.submit("srs", 1, 34.0)
    (o,) = scored(c.submit("csrs", 1, 34.0, instrument="CSRS"))
    assert (o.session.cutoff, o.session.flags, o.session.previous_total) == (32.0, (), None)


# --- redelivery -------------------------------------------------------------------------------


def test_the_same_version_twice_is_a_redelivery_that_changes_nothing() -> None:
    c = Client()
    c.feed(38.0)
    v = c.version("s2", 2, 30.0)
    c.apply(v)
    before = c.state.copy()
    again = c.apply(v)
    assert again.redelivered and again.outputs == [] and not again.changed and again.rejection is None
    assert c.state == before


def test_a_redelivery_after_the_tenants_rules_changed_publishes_the_record_anew_under_them() -> None:
    # The first attempt's events may never have reached the broker (a crash after the state write):
    # re-emitting only what matches the old decisions would then lose them for good.
    c = Client()
    c.feed(38.0)
    v = c.version("s2", 2, 37.5)
    c.apply(v)
    c.rules = TenantRules(cutoff=38.0)
    again = c.apply(v)
    assert again.redelivered and again.changed
    assert [(o.session.version.submission_id, o.revision, o.session.cutoff) for o in scored(again)] == [
        ("s1", 2, 38.0), ("s2", 2, 38.0)]
    (a,) = alerts(again)
    assert a.alert.triggers == (R.BELOW_CUTOFF,) and a.alert.session.version.submission_id == "s2"
    assert len(scored(c.state.current_outputs(c.rules))) == 2


def test_an_alert_followed_by_a_session_scored_under_changed_rules_is_superseded_not_withdrawn() -> None:
    # The next session re-scores the record under the tenant's new rules (cutoff 34): session 2's
    # triggers no longer hold there, but no correction cleared them - a later session ended it.
    c = Client()
    c.feed(36.0, 35.5)  # session 2 below the cutoff of 36 (and no drop of 1): an alert
    c.rules = TenantRules(cutoff=34.0)
    step = c.submit("s3", 3, 35.5)
    assert [(s.alert_id, s.status) for s in statuses(step)] == [(alert_id(2), "superseded")]


def test_an_alert_whose_triggers_changed_rules_clear_on_a_redelivery_is_withdrawn() -> None:
    # Nothing later ends it: the session is still the latest and holds no alert under the new rules.
    c = Client()
    c.feed(36.0, 35.5)
    c.rules = TenantRules(cutoff=34.0)
    again = c.apply(c.state.versions["s2"])  # session 2's record redelivered
    assert again.redelivered and [(s.alert_id, s.status) for s in statuses(again)] == [(alert_id(2), "withdrawn")]


def test_a_transfer_redelivered_after_the_tenants_rules_changed_publishes_the_record_anew() -> None:
    c = Client()
    c.feed(37.0)
    c.transfer("tx-1", "south")
    c.rules = TenantRules(cutoff=38.0)
    again = c.transfer("tx-1", "south")
    assert again.redelivered and again.changed and [o.revision for o in scored(again)] == [3]
    assert c.state.site_version == 1


def as_bytes(outputs: list[series.Output]) -> dict[tuple[str, str], bytes]:
    """Each output as the event the handler publishes, keyed as a consumer keeps them (scored events
    per submission id, alert events and statuses per alert id)."""
    out: dict[tuple[str, str], bytes] = {}
    for o in outputs:
        if isinstance(o, series.ScoredOut):
            event = handlers.scored_event(TENANT, CLIENT, o)
            out["scored", o.session.version.submission_id] = event.model_dump_json().encode()
        elif isinstance(o, series.AlertOut):
            out["alert", o.alert.alert_id] = handlers.alert_event(TENANT, CLIENT, o).model_dump_json().encode()
        else:
            out["alert", o.alert_id] = handlers.status_event(TENANT, CLIENT, o).model_dump_json().encode()
    return out


def test_current_outputs_re_emit_the_latest_revisions_byte_equal() -> None:
    c = Client()
    published: list[series.Output] = []
    for step in september_then_november(c, (38.0, 30.0)):
        published += step.outputs
    published += c.submit("nov-2", 2, 33.0, at=NOV + timedelta(days=1)).outputs  # revision 2 of nov-2, its alert
    published += c.submit("nov-1", 1, 37.0, at=NOV + timedelta(days=2)).outputs  # moved: a date corrected
    published += c.submit("sep-1", 1, 37.0).outputs  # sep-2, sep-3 recomputed
    published += c.transfer("tx-1", "south").outputs
    latest = as_bytes(published)  # later outputs replace earlier ones of the same key
    assert as_bytes(c.state.current_outputs(c.rules)) == latest


def test_current_outputs_include_the_status_of_ended_alerts() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    withdrawn = statuses(c.submit("s2", 2, 38.0))
    assert statuses(c.state.current_outputs(c.rules)) == withdrawn


# --- the stored form --------------------------------------------------------------------------


RULES_OF_HISTORIES = TenantRules(session_gap=5)


@st.composite
def histories(draw: st.DrawFn) -> ClientState:
    """A client's state after a random mix of sessions, corrections, episodes, transfers and refusals."""
    c = Client(rules=RULES_OF_HISTORIES)
    sites = ["north", "south"]
    for i in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["submit", "submit", "submit", "fix", "transfer"]))
        if kind == "transfer":
            c.transfer(f"tx-{i}", draw(st.sampled_from(sites)))
            continue
        sid = f"s{i}" if kind == "submit" or not c.state.versions else draw(st.sampled_from(sorted(c.state.versions)))
        n = draw(st.integers(1, 40))
        at = draw(st.sampled_from([SEPT, NOV])) + timedelta(days=n, hours=draw(st.integers(0, 3)))
        use_items = draw(st.booleans())
        items = tuple(draw(st.integers(0, 100)) / 10 for _ in range(4)) if use_items else None
        c.submit(sid, n, None if use_items else draw(st.integers(0, 400)) / 10, items=items, at=at,
                 site=draw(st.sampled_from([*sites, c.state.owner or "north"])),
                 episode=draw(st.sampled_from([None, None, "ep-1"])),
                 instrument=draw(st.sampled_from(["SRS", "SRS", "CSRS", "YCSRS"])))
    return c.state


@settings(max_examples=150, deadline=None)
@given(histories())
def test_every_accepted_version_redelivered_changes_nothing_and_publishes_nothing(state: ClientState) -> None:
    for v in list(state.versions.values()):
        before = state.copy()
        step = state.submit(v, RULES_OF_HISTORIES, NOW)
        assert step.redelivered and step.outputs == [] and not step.changed
        assert state == before


@settings(max_examples=150, deadline=None)
@given(histories())
def test_stored_state_round_trips_through_its_document(state: ClientState) -> None:
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, state, 7))
    assert back.version == 7
    back.version = state.version
    assert back == state
    assert back.current_outputs(RULES) == state.current_outputs(RULES)


# --- the view kept between steps (extend) equals the view derived afresh ------------------------


def _fresh(state: ClientState, rules: TenantRules) -> object:
    sites = {aid: a.site_id for aid, a in state.alerts.items()}
    return derive(state.versions.values(), state.owner, state.site_version, rules, TENANT, CLIENT, sites)


@st.composite
def growing_records(draw: st.DrawFn) -> list[tuple[str, dict[str, object]]]:
    """Steps of a record that mostly grows one session at a time (what `extend` handles), mixed
    with what it must hand to `derive`: restarts, given episodes, sessions back in time,
    corrections, other instruments, transfers and a change of rules."""
    steps: list[tuple[str, dict[str, object]]] = []
    n, day = 0, 0
    for i in range(draw(st.integers(1, 16))):
        kind = draw(st.sampled_from(["next", "next", "next", "restart", "past", "fix", "transfer", "rules"]))
        day += draw(st.integers(0, 2))
        n = 1 if kind == "restart" else n + draw(st.integers(1, 2))
        at = SEPT + timedelta(days=day, hours=draw(st.integers(0, 2)))
        if kind == "past":
            at, n = SEPT + timedelta(days=draw(st.integers(0, max(day, 0)))), draw(st.integers(1, 8))
        steps.append((kind, {"sid": f"s{i}", "n": n, "at": at, "total": draw(st.integers(200, 400)) / 10,
                             "episode": draw(st.sampled_from([None, None, None, "ep-1", "ep-2"])),
                             "instrument": draw(st.sampled_from(["SRS", "SRS", "SRS", "CSRS", "YCSRS"])),
                             "site": draw(st.sampled_from(["north", "south"]))}))
    return steps


@settings(max_examples=300, deadline=None)
@given(growing_records())
def test_the_view_kept_between_steps_is_the_view_derived_from_the_versions(
        steps: list[tuple[str, dict[str, object]]]) -> None:
    c = Client(rules=RULES_OF_HISTORIES)
    for kind, s in steps:
        if kind == "transfer":
            c.transfer(str(s["sid"]), str(s["site"]))
        elif kind == "rules":
            c.rules = TenantRules(session_gap=5, cutoff=float(s["n"]) % 40)  # type: ignore[arg-type]
        else:
            sid = str(s["sid"]) if kind != "fix" or not c.state.versions else sorted(c.state.versions)[0]
            c.submit(sid, s["n"], s["total"], at=s["at"], episode=s["episode"],  # type: ignore[arg-type]
                     instrument=s["instrument"], site=c.state.owner or "north")
        assert c.state.view(c.rules) == _fresh(c.state, c.rules)


def test_a_record_growing_one_session_at_a_time_is_not_derived_again(monkeypatch: object) -> None:
    import services.scoring.series as series

    c = Client()
    c.feed(38.0)
    calls: list[int] = []
    real = series.derive
    monkeypatch.setattr(series, "derive", lambda *a, **k: calls.append(1) or real(*a, **k))  # type: ignore[attr-defined]
    steps = [c.submit(f"s{n}", n, 38.0 - n) for n in range(2, 8)]
    assert calls == [] and all(alerts(s) for s in steps[1:])
    assert c.state.view(c.rules) == _fresh(c.state, c.rules)


SMALL_CAPS = TenantRules(session_gap=3, max_episode_sessions=3)


@settings(max_examples=300, deadline=None)
@given(growing_records(), st.integers(1, 12), st.integers(0, 30), st.sampled_from([None, "ep-1", "ep-2"]))
def test_a_new_session_is_refused_alike_from_the_kept_view_and_from_the_versions(
        steps: list[tuple[str, dict[str, object]]], n: int, day: int, episode: str | None) -> None:
    c = Client(rules=SMALL_CAPS)
    for kind, s in steps:
        if kind not in ("transfer", "rules"):
            c.submit(str(s["sid"]), s["n"], s["total"], at=s["at"], episode=s["episode"],  # type: ignore[arg-type]
                     instrument="SRS", site="north")
    candidate = c.version("new", n, 30.0, at=SEPT + timedelta(days=day), episode=episode)
    c.state.view(c.rules)  # the view kept, as after any step
    kept = c.state._refusal(candidate, c.rules)
    c.state.cached = None
    assert kept == c.state._refusal(candidate, c.rules)


@settings(max_examples=300, deadline=None)
@given(growing_records())
def test_a_grown_record_publishes_what_the_full_diff_publishes(steps: list[tuple[str, dict[str, object]]]) -> None:
    kept, fresh = Client(rules=RULES_OF_HISTORIES), Client(rules=RULES_OF_HISTORIES)
    for kind, s in steps:
        got: list[series.Step] = []
        for c in (kept, fresh):
            if c is fresh:
                c.state.cached = None  # derived afresh and diffed in full every step
            if kind == "transfer":
                got.append(c.transfer(str(s["sid"]), str(s["site"])))
            elif kind == "rules":
                c.rules = TenantRules(session_gap=5, cutoff=float(s["n"]) % 40)  # type: ignore[arg-type]
            else:
                sid = str(s["sid"]) if kind != "fix" or not c.state.versions else sorted(c.state.versions)[0]
                got.append(c.submit(sid, s["n"], s["total"], at=s["at"], episode=s["episode"],  # type: ignore[arg-type]
                                    instrument=s["instrument"], site=c.state.owner or "north"))
        if got:
            assert got[0] == got[1]
        assert kept.state == fresh.state


def test_stored_digests_keep_the_values_earlier_versions_stored() -> None:
    # The digests are stored in every client's state and compared with fresh ones on each step:
    # a change (e.g. an enum member's repr entering one, where a plain string was) would republish
    # every session and alert as a new revision. Values computed before `Severity` was an enum.
    v = Version("sub-1", "SRS", "ep-1", 2, datetime(2026, 1, 5, 9, tzinfo=UTC), "north", "c-1",
                (8.0, 8.0, 8.0, 8.5), None, datetime(2026, 1, 5, 9, 5, tzinfo=UTC))
    s = R.score(32.5, None, 36.0, True, TenantRules())
    session = SessionView(v, "ep-1", False, "north", 0, s.total, s.cutoff, "<", s.previous_total,
                          s.change_from_previous, s.flags, s.triggers, s.severity, s.low_items, True)
    alert = AlertView("alert-1", session, s.triggers, s.severity or Severity.WARNING, "north")
    assert (s.severity, v.digest, session.digest, alert.digest) == (
        Severity.CRITICAL, "f0571247da3bdce9a83e", "9627261a4410c4466860", "17c91ffc53587dd7b103")


# --- what a redelivery re-emits of an ended alert -------------------------------------------------


def test_an_ended_alert_re_emits_the_raise_it_published_then_its_end() -> None:
    c = Client()
    (raised,) = alerts(c.feed(38.0, 30.0)[1])
    c.submit("s3", 3, 38.0)  # supersedes session 2's alert
    again = c.state.current_outputs(RULES)
    assert [(a.alert.alert_id, a.revision, a.at, a.alert.digest) for a in alerts(again)] == [
        (raised.alert.alert_id, raised.revision, raised.at, raised.alert.digest)]
    assert [(s.alert_id, s.status) for s in statuses(again)] == [(alert_id(2), "superseded")]


def test_an_ended_alert_re_emits_its_last_revision_not_its_first() -> None:
    c = Client()
    c.feed(38.0, 30.0)
    (revised,) = alerts(c.submit("s2", 2, 28.0))  # a correction that still triggers: revision 2
    c.submit("s3", 3, 38.0)
    (again,) = alerts(c.state.current_outputs(RULES))
    assert (again.revision, again.at, again.alert.session.total) == (2, revised.at, 28.0)


def test_an_alert_ended_in_a_record_stored_before_raise_times_were_kept_re_emits_only_its_end() -> None:
    c = Client()
    c.feed(38.0, 30.0, 38.0)
    key = ClientKey(TENANT, CLIENT)
    doc = state_doc(key, c.state, 1)
    for a in doc["al"]:
        a.pop("ra")  # as such a record was stored
    back = state_from(key, doc)
    assert alerts(back.current_outputs(RULES)) == []
    assert [s.status for s in statuses(back.current_outputs(RULES))] == ["superseded"]


def _reemitted(state: ClientState, aid: str) -> tuple[list[series.AlertOut], list[str]]:
    """What a redelivery re-emits of one alert: its raises, and its statuses."""
    again = state.current_outputs(RULES)
    return [a for a in alerts(again) if a.alert.alert_id == aid], [s.status for s in statuses(again)
                                                                    if s.alert_id == aid]


@pytest.mark.parametrize("read_back", [False, True], ids=["kept-in-memory", "read-from-the-store"])
def test_an_alert_withdrawn_by_moving_its_session_to_another_episode_re_emits_its_raise_then_the_withdrawal(
        read_back: bool) -> None:
    c = Client()
    c.feed(38.0)
    (raised,) = alerts(c.submit("s2", 2, 30.0))
    if read_back:  # no view kept: what the record showed is derived again
        key = ClientKey(TENANT, CLIENT)
        c.state = state_from(key, state_doc(key, c.state, 1))
    step = c.submit("s2", 2, 30.0, episode="ep-b")  # the session leaves the derived episode
    assert [(s.alert_id, s.status) for s in statuses(step)] == [(alert_id(2), "withdrawn")]
    assert _reemitted(c.state, alert_id(2)) == ([raised], ["withdrawn"])


@pytest.mark.parametrize("total, instrument", [(39.0, "SRS"), (30.0, "YCSRS")],
                         ids=["clears-its-triggers", "into-an-unscored-form"])  # YCSRS: stored, never scored
def test_an_alert_withdrawn_by_a_correction_re_emits_its_raise_then_the_withdrawal(total: float,
                                                                                  instrument: str) -> None:
    c = Client()
    c.feed(38.0)
    (raised,) = alerts(c.submit("s2", 2, 30.0))
    c.submit("s2", 2, total, instrument=instrument)
    assert _reemitted(c.state, alert_id(2)) == ([raised], ["withdrawn"])


def test_a_withdrawn_alerts_kept_raise_survives_the_store() -> None:
    c = Client()
    c.feed(38.0)
    (raised,) = alerts(c.submit("s2", 2, 30.0, items=(6.0, 7.5, 8.0, 8.5)))  # low items, flags: every field
    c.submit("s2", 2, 30.0, items=(6.0, 7.5, 8.0, 8.5), episode="ep-b")
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, c.state, 1))
    assert back.alerts == c.state.alerts
    assert _reemitted(back, alert_id(2)) == ([raised], ["withdrawn"])


def test_only_a_withdrawn_alert_keeps_its_raise() -> None:
    c = Client()
    c.feed(38.0, 30.0, 38.0)  # session 2's alert superseded: scored again from its slot
    assert [(a.state, a.raised) for a in c.state.alerts.values()] == [("superseded", None)]


def test_an_alert_withdrawn_in_a_record_stored_before_raises_were_kept_re_emits_only_its_withdrawal() -> None:
    c = Client()
    c.feed(38.0)
    c.submit("s2", 2, 30.0)
    c.submit("s2", 2, 30.0, episode="ep-b")
    key = ClientKey(TENANT, CLIENT)
    doc = state_doc(key, c.state, 1)
    for a in doc["al"]:
        a.pop("rv", None)  # as such a record was stored
    assert _reemitted(state_from(key, doc), alert_id(2)) == ([], ["withdrawn"])
