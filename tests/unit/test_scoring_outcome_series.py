"""ORS-family sessions in a client's record (services/scoring/series.py; docs/outcome.md): they
live in the same record as the client's SRS sessions, episodes, corrections, session gaps, site
ownership and the alert lifecycle work per outcome instrument as for the SRS, and an alliance
alert whose session also holds an outcome alert is `outcome_at_risk` and critical, whichever
form arrives first."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring import series
from services.scoring.rules import OutcomeRules, TenantRules
from services.scoring.series import ClientState, OutcomeView, SessionView, Version, derive, extend
from services.scoring.store import ClientKey, state_doc, state_from
from shared import ids
from shared.events import Severity

TENANT, CLIENT = "acme", "c-1"
SEPT = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
ACCEPTED = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RULES = TenantRules()
EPISODE = "auto/2026-09-01/1"


@dataclass
class Client:
    rules: TenantRules = RULES
    state: ClientState = field(default_factory=lambda: ClientState(TENANT, CLIENT))
    _accepted: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def version(self, sid: str, n: int, total: float, instrument: str = "ORS", *, age: int | None = None,
                site: str = "north", episode: str | None = None, day: int | None = None) -> Version:
        accepted = ACCEPTED + timedelta(seconds=next(self._accepted))
        return Version(sid, instrument, episode, n, SEPT + timedelta(days=n - 1 if day is None else day), site,
                       "clin-1", None, total, accepted, client_age=age)

    def submit(self, sid: str, n: int, total: float, instrument: str = "ORS", **kw: object) -> series.Step:
        return self.state.submit(self.version(sid, n, total, instrument, **kw), self.rules,  # type: ignore[arg-type]
                                 NOW + timedelta(seconds=next(self._accepted)))

    def ors(self, *totals: float) -> list[series.Step]:
        return [self.submit(f"o{n}", n, t) for n, t in enumerate(totals, start=1)]

    def srs(self, *totals: float) -> list[series.Step]:
        return [self.submit(f"s{n}", n, t, "SRS") for n, t in enumerate(totals, start=1)]


def scored(step: series.Step) -> list[series.ScoredOut]:
    return [o for o in step.outputs if isinstance(o, series.ScoredOut)]


def raised(step: series.Step) -> list[series.AlertOut]:
    return [o for o in step.outputs if isinstance(o, series.AlertOut)]


def ended(step: series.Step) -> list[series.StatusOut]:
    return [o for o in step.outputs if isinstance(o, series.StatusOut)]


def outcome(o: series.ScoredOut) -> OutcomeView:
    assert isinstance(o.session, OutcomeView)
    return o.session


def ors_alert(n: int, instrument: str = "ORS") -> str:
    return ids.alert_id(TENANT, CLIENT, instrument, EPISODE, n)


def srs_alert(n: int) -> str:
    return ids.alert_id(TENANT, CLIENT, "SRS", EPISODE, n)


# --- scoring an ORS series --------------------------------------------------------------------


def test_every_ors_session_is_read_against_the_intake_of_its_episode() -> None:
    steps = Client().ors(20.0, 22.0, 26.0)
    (third,) = scored(steps[-1])[-1:]
    s = outcome(third)
    assert (s.intake_total, s.change_from_intake, s.previous_total, s.change_from_previous) == (20.0, 6.0, 22.0, 4.0)
    assert s.change == "reliable_improvement" and s.clinically_significant_improvement


def test_a_reliable_deterioration_raises_a_critical_outcome_alert() -> None:
    steps = Client().ors(20.0, 15.0)
    (alert,) = raised(steps[-1])
    assert alert.alert.alert_id == ors_alert(2) and alert.alert.severity is Severity.CRITICAL
    assert alert.alert.triggers == ("reliable_deterioration",)


def test_the_outcome_alert_of_an_earlier_session_is_superseded_by_the_next_session() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    (status,) = ended(c.submit("o3", 3, 26.0))
    assert (status.alert_id, status.status) == (ors_alert(2), "superseded")


def test_a_correction_that_clears_the_deterioration_withdraws_the_outcome_alert() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    step = c.submit("o2", 2, 19.0)
    assert [(s.alert_id, s.status) for s in ended(step)] == [(ors_alert(2), "withdrawn")]
    assert outcome(scored(step)[0]).total == 19.0


def test_correcting_the_intake_rescores_every_later_session_of_the_episode() -> None:
    c = Client()
    c.ors(20.0, 22.0, 24.0)
    step = c.submit("o1", 1, 17.0)
    changes = {o.session.version.submission_id: outcome(o).change_from_intake for o in scored(step)}
    assert changes == {"o1": 0.0, "o2": 5.0, "o3": 7.0}


def test_a_late_earlier_session_holds_no_alert_and_becomes_the_intake() -> None:
    c = Client()
    c.submit("o2", 2, 20.0)
    c.submit("o3", 3, 25.0)
    step = c.submit("o1", 1, 14.0)
    assert not raised(step)
    third = next(o for o in scored(step) if o.session.version.submission_id == "o3")
    assert outcome(third).intake_total == 14.0 and outcome(third).change == "reliable_improvement"


def test_no_reliable_improvement_by_session_3_is_a_warning_by_session_6_critical() -> None:
    c = Client()
    steps = c.ors(20.0, 21.0, 21.0, 22.0, 22.0, 23.0)
    assert [a.alert.severity for s in steps for a in raised(s)] == ["warning", "warning", "warning", "critical"]


def test_an_adolescents_ors_is_read_against_the_adolescent_cutoff() -> None:
    step = Client().submit("o1", 1, 27.0, age=15)
    s = outcome(scored(step)[0])
    assert (s.band, s.cutoff, s.in_clinical_range) == ("adolescent", 28.0, True)


def test_a_ycors_is_published_with_its_total_only_and_never_alerts() -> None:
    c = Client()
    steps = [c.submit(f"y{n}", n, t, "YCORS") for n, t in ((1, 30.0), (2, 10.0), (3, 10.0))]
    s = outcome(scored(steps[-1])[0])
    assert (s.band, s.cutoff, s.change, s.flags) == ("young_child", None, None, ())
    assert not any(raised(step) for step in steps)


def test_a_tenants_own_outcome_rules_apply() -> None:
    c = Client(rules=TenantRules(outcome={"ORS": OutcomeRules(reliable_change=3.0)}))
    steps = c.ors(20.0, 17.0)
    assert [a.alert.triggers for a in raised(steps[-1])] == [("reliable_deterioration",)]


# --- one record for both scales ---------------------------------------------------------------------


def test_an_ors_from_another_site_than_the_clients_srs_is_a_site_conflict() -> None:
    c = Client()
    c.submit("s1", 1, 38.0, "SRS", site="north")
    step = c.submit("o1", 1, 20.0, site="south")
    assert step.rejection is not None and step.rejection.reason == "site_conflict"


def test_an_ors_far_above_its_episode_is_a_session_gap_whatever_the_srs_holds() -> None:
    c = Client()
    c.srs(*([38.0] * 30))
    c.submit("o1", 1, 20.0)
    step = c.submit("o30", 30, 20.0)
    assert step.rejection is not None and step.rejection.reason == "session_gap"


def test_an_identical_ors_resend_under_a_new_id_is_a_duplicate() -> None:
    c = Client()
    c.submit("o1", 1, 20.0, day=0)
    step = c.submit("o1-again", 1, 20.0, day=0)
    assert step.rejection is not None and step.rejection.reason == "duplicate" and not step.outputs


def test_an_ors_and_an_srs_of_one_session_are_two_slots() -> None:
    c = Client()
    c.submit("s1", 1, 38.0, "SRS")
    c.submit("o1", 1, 20.0)
    view = c.state.view(RULES)
    assert {type(v) for v in view.sessions.values()} == {SessionView, OutcomeView}


# --- a submission id names one submission per scale (docs/clinical-records.md, "Session identity") -------


def test_an_ors_and_an_srs_under_one_submission_id_are_both_scored_and_neither_supersedes() -> None:
    c = Client()
    srs = c.submit("appt-1", 1, 38.0, "SRS")
    ors = c.submit("appt-1", 1, 20.0)
    assert [type(o.session) for o in scored(srs) + scored(ors)] == [SessionView, OutcomeView]
    assert all(o.supersedes is None for o in scored(srs) + scored(ors)) and ors.rejection is None
    assert {type(v) for v in c.state.view(RULES).sessions.values()} == {SessionView, OutcomeView}


def test_moving_a_submission_id_from_an_srs_to_an_ors_is_a_new_submission_not_a_correction() -> None:
    c = Client()
    c.submit("appt-1", 1, 38.0, "SRS")
    c.submit("appt-1", 2, 37.0, "SRS")  # a correction within the alliance scale: same id, same session
    step = c.submit("appt-1", 2, 20.0)
    assert [(o.session.version.instrument, o.revision, o.supersedes) for o in scored(step)] == [("ORS", 1, None)]
    assert sorted(v.version.instrument for v in c.state.view(RULES).sessions.values()) == ["ORS", "SRS"]


def test_a_correction_within_the_outcome_scale_under_a_shared_id_leaves_the_srs_alone() -> None:
    c = Client()
    c.submit("appt-1", 1, 38.0, "SRS")
    c.submit("appt-1", 1, 20.0)
    step = c.submit("appt-1", 1, 22.0)
    assert [(outcome(o).total, o.revision) for o in scored(step)] == [(22.0, 2)]


def test_a_redelivered_ors_under_a_shared_id_re_emits_both_scales_unchanged() -> None:
    c = Client()
    c.submit("appt-1", 1, 38.0, "SRS")
    ors = c.version("appt-1", 1, 20.0)
    first = c.state.submit(ors, RULES, NOW)
    again = c.state.submit(ors, RULES, NOW + timedelta(hours=1))
    assert again.redelivered and not again.outputs and first.outputs
    assert sorted(o.session.version.instrument for o in c.state.current_outputs(RULES)
                  if isinstance(o, series.ScoredOut)) == ["ORS", "SRS"]


def test_state_with_a_shared_id_reads_back_from_its_stored_document_unchanged() -> None:
    c = Client()
    c.submit("appt-1", 1, 38.0, "SRS")
    c.submit("appt-1", 1, 20.0)
    c.submit("appt-1", 1, 22.0)
    c.submit("appt-2", 2, 30.0, site="south")  # refused (site_conflict): kept per scale too
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, c.state, 1))
    assert (back.versions, back.rejected, back.published, back.submission_revision) == (
        c.state.versions, c.state.rejected, c.state.published, c.state.submission_revision)


def test_an_ors_stored_before_scales_were_keyed_apart_reads_as_an_outcome_submission() -> None:
    c = Client()
    c.submit("o1", 1, 20.0)
    c.submit("o1", 1, 22.0)
    refused = c.version("o9", 9, 20.0, site="south")
    c.state.submit(refused, RULES, NOW)
    key = ClientKey(TENANT, CLIENT)
    doc = state_doc(key, c.state, 1)
    # What the document looked like then: every map keyed by the submission id alone.
    legacy = {**{k: v for k, v in doc.items() if k not in ("sro", "rso")}, "sr": doc["sro"],
              "rej": [{k: v for k, v in r.items() if k != "o"} for r in doc["rej"]]}
    back = state_from(key, legacy)
    assert back.submission_revision["ors\x1fo1"] == 2 and back.published == c.state.published
    assert back.submit(refused, RULES, NOW).rejection == c.state.rejected["ors\x1fo9"]
    assert [(outcome(o).total, o.revision) for o in scored(back.submit(c.version("o1", 1, 23.0), RULES, NOW))] == [
        (23.0, 3)]


# --- outcome_at_risk ------------------------------------------------------------------------------------


def test_an_srs_alert_whose_session_holds_an_outcome_alert_is_critical_and_at_risk_ors_first() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.submit("s1", 1, 38.0, "SRS")
    (alert,) = raised(c.submit("s2", 2, 37.0, "SRS"))  # a drop of 1: a warning by the alliance rules
    assert alert.alert.alert_id == srs_alert(2) and alert.revision == 1
    assert alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.CRITICAL
    assert alert.alert.severity is Severity.WARNING


def test_an_srs_alert_is_revised_at_risk_when_the_ors_of_its_session_alerts_srs_first() -> None:
    c = Client()
    c.srs(38.0, 37.0)
    c.submit("o1", 1, 20.0)
    step = c.submit("o2", 2, 15.0)
    by_id = {a.alert.alert_id: a for a in raised(step)}
    assert set(by_id) == {ors_alert(2), srs_alert(2)}
    assert by_id[srs_alert(2)].revision == 2 and by_id[srs_alert(2)].alert.outcome_at_risk


def test_an_srs_alert_is_revised_back_when_a_correction_withdraws_the_outcome_alert() -> None:
    c = Client()
    c.srs(38.0, 37.0)
    c.ors(20.0, 15.0)
    step = c.submit("o2", 2, 19.0)
    (alert,) = raised(step)
    assert alert.alert.alert_id == srs_alert(2) and alert.revision == 3
    assert not alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.WARNING


# `outcome_at_risk` is a clinical fact about the session: the ORS of the same session triggers an
# outcome alert. The next session's ORS supersedes that outcome alert (a lifecycle status), and
# says nothing about the session before it.


def test_an_srs_alert_stays_at_risk_when_the_next_sessions_ors_supersedes_its_sessions_outcome_alert() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.srs(38.0, 37.0)
    step = c.submit("o3", 3, 14.0)  # still reliably worse: its own outcome alert supersedes session 2's
    assert [(s.alert_id, s.status) for s in ended(step)] == [(ors_alert(2), "superseded")]
    assert [a.alert.alert_id for a in raised(step)] == [ors_alert(3)]
    alert = c.state.view(RULES).alerts[srs_alert(2)]
    assert alert.outcome_at_risk and alert.shown_severity is Severity.CRITICAL


def test_an_srs_alert_stays_at_risk_when_the_next_sessions_ors_no_longer_alerts() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.srs(38.0, 37.0)
    step = c.submit("o3", 3, 26.0)  # a reliable improvement: no outcome alert at session 3
    assert [a.alert.alert_id for a in raised(step)] == []
    assert c.state.view(RULES).alerts[srs_alert(2)].outcome_at_risk


def test_an_srs_alert_posted_after_the_next_sessions_ors_is_at_risk_when_its_own_sessions_ors_triggers() -> None:
    c = Client()
    c.ors(20.0, 15.0, 26.0)
    c.submit("s1", 1, 38.0, "SRS")
    (alert,) = raised(c.submit("s2", 2, 37.0, "SRS"))
    assert alert.alert.alert_id == srs_alert(2) and alert.revision == 1
    assert alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.CRITICAL


def test_a_correction_clearing_a_superseded_sessions_ors_triggers_revises_its_srs_alert_back() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.srs(38.0, 37.0)
    c.submit("o3", 3, 26.0)
    (alert,) = raised(c.submit("o2", 2, 19.0))  # no longer a reliable deterioration, and session 2 < 3
    assert alert.alert.alert_id == srs_alert(2) and alert.revision == 2
    assert not alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.WARNING


def test_a_correction_making_a_superseded_sessions_ors_trigger_revises_its_srs_alert_at_risk() -> None:
    c = Client()
    c.ors(20.0, 19.0, 26.0)
    c.srs(38.0, 37.0)
    (alert,) = raised(c.submit("o2", 2, 15.0))
    assert alert.alert.alert_id == srs_alert(2) and alert.revision == 2
    assert alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.CRITICAL


def test_an_outcome_alert_of_another_session_does_not_put_the_srs_alert_at_risk() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.srs(38.0, 38.0, 37.0)
    alert = c.state.view(RULES).alerts[srs_alert(3)]
    assert not alert.outcome_at_risk


def test_a_cors_alert_puts_a_csrs_alert_at_risk() -> None:
    c = Client()
    c.submit("c1", 1, 30.0, "CORS")
    c.submit("c2", 2, 24.0, "CORS")
    c.submit("k1", 1, 38.0, "CSRS")
    c.submit("k2", 2, 37.0, "CSRS")
    alert = c.state.view(RULES).alerts[ids.alert_id(TENANT, CLIENT, "CSRS", EPISODE, 2)]
    assert alert.outcome_at_risk


def test_an_ors_alert_does_not_put_a_csrs_alert_at_risk() -> None:
    c = Client()
    c.ors(20.0, 15.0)
    c.submit("k1", 1, 38.0, "CSRS")
    c.submit("k2", 2, 37.0, "CSRS")
    alert = c.state.view(RULES).alerts[ids.alert_id(TENANT, CLIENT, "CSRS", EPISODE, 2)]
    assert not alert.outcome_at_risk


# A form missing at the first session of an episode: each scale derives its episode from its own
# first session, so the ORS begun at session 2 is `auto/<its date>/2` beside the SRS's
# `auto/<date>/1`. The sessions both scales hold are still one session each (docs/outcome.md).


def test_an_srs_alert_is_at_risk_when_the_ors_of_its_session_alerts_in_an_ors_begun_at_session_2() -> None:
    c = Client()
    c.submit("s1", 1, 38.0, "SRS")  # the ORS of session 1 was not given
    c.submit("o2", 2, 20.0)
    c.submit("s2", 2, 38.0, "SRS")
    c.submit("o3", 3, 14.0)  # 6 below its intake (session 2): a reliable deterioration
    (alert,) = raised(c.submit("s3", 3, 37.0, "SRS"))  # a drop of 1: a warning by the alliance rules
    assert alert.alert.alert_id == srs_alert(3)
    assert alert.alert.outcome_at_risk and alert.alert.shown_severity is Severity.CRITICAL


def test_an_srs_alert_is_at_risk_when_the_ors_of_its_session_alerts_and_the_srs_began_at_session_2() -> None:
    c = Client()
    c.ors(20.0, 20.0, 14.0)  # the SRS of session 1 was not given
    c.submit("s2", 2, 38.0, "SRS")
    (alert,) = raised(c.submit("s3", 3, 37.0, "SRS"))
    assert alert.alert.alert_id == ids.alert_id(TENANT, CLIENT, "SRS", "auto/2026-09-02/2", 3)
    assert alert.alert.outcome_at_risk


def test_an_ors_begun_at_session_2_two_days_from_the_srs_of_its_number_is_not_the_same_session() -> None:
    c = Client()
    c.srs(38.0, 38.0, 37.0)
    c.submit("o2", 2, 20.0, day=3)
    c.submit("o3", 3, 14.0, day=4)  # the SRS of session 3 was given on day 2
    assert not c.state.view(RULES).alerts[srs_alert(3)].outcome_at_risk


# --- the view kept between steps (extend) equals the view derived afresh --------------------------------


@st.composite
def mixed_steps(draw: st.DrawFn) -> list[Version]:
    """Versions of a record of both scales: sessions of one or two courses, each given an ORS, an
    SRS or both (ORS and SRS, or CORS and CSRS, or a YCORS), mostly in order (what `extend`
    handles), with corrections, a few sessions arriving late, given episode ids and ages."""
    out: list[Version] = []
    clock = itertools.count()
    day = 0
    for course in range(draw(st.integers(1, 2))):
        episode = draw(st.sampled_from([None, None, f"E{course}"]))
        pair = draw(st.sampled_from([("ORS", "SRS"), ("ORS", "SRS"), ("CORS", "CSRS"), ("YCORS", "SRS")]))
        for n in range(1, draw(st.integers(1, 8)) + 1):
            day += 1
            for instrument in draw(st.sampled_from([pair, pair[::-1], pair[:1], pair[1:]])):
                total = draw(st.sampled_from([10.0, 15.0, 19.9, 20.0, 24.9, 25.0, 30.0, 36.0, 37.0, 39.0]))
                age = draw(st.sampled_from([None, 15, 40]))
                out.append(Version(f"{instrument}-{course}-{n}", instrument, episode, n, SEPT + timedelta(days=day),
                                   "north", "clin-1", None, total, ACCEPTED + timedelta(seconds=next(clock)),
                                   client_age=age))
                if draw(st.integers(0, 5)) == 0:  # a correction, now or later
                    fix = draw(st.sampled_from([10.0, 20.0, 30.0, 39.0]))
                    out.append(Version(out[-1].submission_id, instrument, episode, n, SEPT + timedelta(days=day),
                                       "north", "clin-1", None, fix, ACCEPTED, client_age=age))
    late = draw(st.lists(st.integers(0, max(0, len(out) - 1)), max_size=3))
    for i in late:  # a version arriving after the ones posted after it
        out.append(out.pop(i))
    # Acceptance follows arrival (intake stamps them in order).
    return [Version(v.submission_id, v.instrument, v.episode_id, v.session_number, v.administered_at, v.site_id,
                    v.clinician_id, v.items, v.total, ACCEPTED + timedelta(seconds=i), client_age=v.client_age)
            for i, v in enumerate(out)]


@settings(max_examples=300, deadline=None)
@given(versions=mixed_steps())
def test_extend_equals_derive_on_mixed_ors_and_srs_records(versions: list[Version]) -> None:
    kept: dict[str, Version] = {}
    view = derive([], None, 0, RULES, TENANT, CLIENT)
    for v in versions:
        grown = extend(view, v, "north", 0, RULES, TENANT, CLIENT)
        kept[v.submission_id] = v
        fresh = derive(kept.values(), "north", 0, RULES, TENANT, CLIENT)
        if grown is not None:
            assert grown.sessions == fresh.sessions
            assert grown.alerts == fresh.alerts
            assert {a: x.outcome_at_risk for a, x in grown.alerts.items()} == \
                   {a: x.outcome_at_risk for a, x in fresh.alerts.items()}
            assert (grown.current, grown.members, grown.slot_of_key) == (fresh.current, fresh.members,
                                                                         fresh.slot_of_key)
        view = fresh


@settings(max_examples=200, deadline=None)
@given(versions=mixed_steps())
def test_the_outputs_of_a_record_grown_by_extend_equal_those_of_one_derived_each_step(versions: list[Version]) -> None:
    fast, slow = ClientState(TENANT, CLIENT), ClientState(TENANT, CLIENT)
    for i, v in enumerate(versions):
        a = fast.submit(v, RULES, NOW)
        slow.cached = None  # no view kept: every step derives afresh and diffs everything
        b = slow.submit(v, RULES, NOW)
        assert (a.outputs, a.rejection) == (b.outputs, b.rejection), i


def test_an_outcome_alert_withdrawn_by_moving_its_session_keeps_its_raise_through_the_store() -> None:
    c = Client()
    c.ors(20.0)
    (alert,) = raised(c.submit("o2", 2, 15.0))
    c.submit("o2", 2, 15.0, episode="ep-b")  # the session leaves the derived episode: withdrawn
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, c.state, 1))
    again = back.current_outputs(RULES)
    assert [o for o in again if isinstance(o, series.AlertOut)] == [alert]
    assert [(o.alert_id, o.status) for o in again if isinstance(o, series.StatusOut)] == [
        (ors_alert(2), "withdrawn")]
