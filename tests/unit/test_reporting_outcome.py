"""Reporting's pure rules for the outcome half (ORS): the same merge algebra as the SRS records,
the ORS series as scoring decided it, both scales aligned by session, and the FHIR resources."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.reporting import fhir, rules
from services.reporting.models import CaseloadEntryOut, SummaryOut, TrajectoryOut
from shared.events import AlertStatus, Flag, OrsItems, OrsScored, OutcomeInstrument, Severity
from tests.support.outcome_events import ors_scored, outcome_alert_for, outcome_series
from tests.unit.test_reporting_rules import content, fold  # the same batched fold the SRS rules are tested with
from tools.demo import BASE, deterioration_for, scored

T = "tenant-o"
ITEMS = OrsItems(individually=4.0, interpersonally=5.0, socially=4.5, overall=4.5)


def corrected(event: OrsScored, total: float, **changes: Any) -> OrsScored:
    """The next revision of an ORS session with another total (scoring's values recomputed)."""
    return ors_scored(event.tenant_id, event.client_id, event.session_number, total,
                      intake_total=event.intake_total if event.session_number > 1 else None,
                      previous_total=event.previous_total, episode_id=event.episode_id,
                      revision=changes.pop("revision", event.revision + 1),
                      submission_id=changes.pop("submission_id", event.submission_id),
                      administered_at=changes.pop("administered_at", event.administered_at), **changes)


def alert_doc(event: Any, *, acknowledged: bool = False) -> dict[str, Any]:
    """An alert document as the store merges it from one raise."""
    return {"_id": event.alert_id, **rules.alert_identity(event), "raised": True, "acknowledged": acknowledged,
            "life": rules.life_key(event.revision, "raised"), "raises": {str(event.revision): rules.alert_raise(event)},
            "raised_at": event.occurred_at}


def test_an_ors_record_is_its_own_record_beside_the_srs_one() -> None:
    srs = scored(T, "c1", 1, 30.0)
    ors = ors_scored(T, "c1", 1, 18.0, intake_total=None)
    assert rules.record_id(T, "c1", srs.instrument) != rules.record_id(T, "c1", ors.instrument)
    assert set(rules.group_by_record([srs, ors])) == {rules.record_id(T, "c1", "SRS"), rules.record_id(T, "c1", "ORS")}


def test_an_ors_record_shows_scoring_s_outcome_of_its_latest_session() -> None:
    doc = fold(outcome_series(T, "c1", [15.0, 18.0, 21.0]))
    assert (doc["instrument"], doc["session_count"], doc["latest_total"]) == ("ORS", 3, 21.0)
    assert (doc["change"], doc["change_from_intake"], doc["cutoff"]) == ("reliable_improvement", 6.0, 25.0)
    assert doc["age_band"] == "adult" and "at_risk" not in doc  # the alliance's risk is not the outcome's


@pytest.mark.parametrize(("outcome", "listed_as"), [(OutcomeInstrument.ORS, "SRS"), (OutcomeInstrument.CORS, "CSRS"),
                                                    (OutcomeInstrument.YCORS, "YCSRS")])
def test_an_outcome_record_sorts_in_a_caseload_as_the_not_at_risk_alliance_line_it_stands_for(
        outcome: OutcomeInstrument, listed_as: str) -> None:
    doc = fold(outcome_series(T, "c1", [15.0, 8.0], instrument=outcome))
    assert doc["caseload_key"] == rules.caseload_key(False, "c1", listed_as)


def test_an_outcome_record_pairs_with_every_alliance_instrument_of_its_scale() -> None:
    doc = fold(outcome_series(T, "c1", [15.0]))
    assert rules.paired_record_ids(doc) == [rules.record_id(T, "c1", "SRS"), rules.record_id(T, "c1", "GSRS")]


def test_the_caseload_line_of_an_outcome_only_client_has_no_alliance_values_and_its_latest_outcome() -> None:
    ors = outcome_series(T, "c1", [20.0, 14.0])
    line = rules.caseload_outcome_entry(fold(ors), [alert_doc(outcome_alert_for(ors[1]))])
    assert (line["instrument"], line["latest_total"], line["cutoff"], line["points"], line["at_risk"]) == (
        "SRS", None, None, [], False)
    assert (line["outcome"]["latest_total"], line["outcome"]["change_from_intake"],
            [a["session_number"] for a in line["outcome"]["alerts"]]) == (14.0, -6.0, [2])
    CaseloadEntryOut.model_validate(line)


def test_a_duplicated_ors_event_changes_nothing() -> None:
    e = ors_scored(T, "c1", 1, 18.0, intake_total=None)
    doc = fold([e])
    again = rules.merge(doc, [e, e])
    assert again.doc is None and [o for _, o in again.outcomes] == ["duplicate", "duplicate"]


def test_a_corrected_ors_session_shows_its_highest_revision_and_a_stale_replay_does_not_undo_it() -> None:
    first = outcome_series(T, "c1", [15.0, 12.0])
    fix = corrected(first[1], 20.5)
    doc = fold([*first, fix, first[1]])
    session = rules.outcome_series(doc, [], "ep-1")["sessions"][1]
    assert (session["total"], session["revision"], session["change"]) == (20.5, 2, "reliable_improvement")


def test_a_correction_under_a_new_id_supersedes_the_earlier_ors_submission() -> None:
    first = outcome_series(T, "c1", [15.0, 12.0])
    fix = corrected(first[1], 14.0, submission_id="ors-fix", supersedes=first[1].submission_id)
    result = rules.merge(fold(first), [fix])
    assert [o for _, o in result.outcomes] == ["corrected"] and result.doc is not None
    sessions = rules.outcome_series(result.doc, [], "ep-1")["sessions"]
    assert [s["submission_id"] for s in sessions] == [first[0].submission_id, "ors-fix"]


@st.composite
def ors_replays(draw: st.DrawFn) -> tuple[list[OrsScored], list[OrsScored], int]:
    totals = draw(st.lists(st.integers(0, 400).map(lambda t: t / 10), min_size=1, max_size=6))
    clean: list[OrsScored] = list(outcome_series(T, "c1", totals))
    for n in draw(st.lists(st.integers(0, len(totals) - 1), max_size=4)):
        current = max((e for e in clean if e.session_number == n + 1), key=lambda e: e.revision)
        clean.append(corrected(current, draw(st.integers(0, 400)) / 10))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    replay = clean + [rng.choice(clean) for _ in range(draw(st.integers(0, 6)))]
    rng.shuffle(replay)
    return clean, replay, draw(st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(ors_replays())
def test_any_order_and_batching_of_ors_events_gives_the_ordered_streams_record(
        data: tuple[list[OrsScored], list[OrsScored], int]) -> None:
    clean, replay, batch = data
    ordered = fold(clean, 1)
    assert content(fold(replay, batch)) == content(ordered)
    assert rules.merge(ordered, replay).doc is None


def test_the_series_carries_scoring_s_values_and_the_reliable_change_band_around_the_intake() -> None:
    events = outcome_series(T, "c1", [18.0, 19.5, 24.0, 26.0], items=ITEMS)
    series = rules.outcome_series(fold(events), [], "ep-1")
    assert (series["instrument"], series["cutoff"], series["reliable_change_index"]) == ("ORS", 25.0, 5.0)
    assert series["intake_total"] == 18.0
    assert series["reliable_change_band"] == {"low": 13.0, "high": 23.0}
    last = series["sessions"][-1]
    assert (last["change_from_intake"], last["change"], last["clinically_significant_improvement"],
            last["in_clinical_range"]) == (8.0, "reliable_improvement", True, False)
    assert series["sessions"][0]["items"] == ITEMS.model_dump()
    assert [s["change_from_previous"] for s in series["sessions"]] == [None, 1.5, 4.5, 2.0]


def test_the_series_shows_what_scoring_published_even_where_a_recomputation_would_differ() -> None:
    # scoring decided with the tenant's rules (say a cutoff of 28): reporting shows that, never its own
    event = ors_scored(T, "c1", 1, 26.0, intake_total=None).model_copy(
        update={"cutoff": 28.0, "in_clinical_range": True, "flags": ["in_clinical_range"]})
    session = rules.outcome_series(fold([event]), [], "ep-1")["sessions"][0]
    assert (session["cutoff"], session["in_clinical_range"], session["flags"]) == (28.0, True, ["in_clinical_range"])


def test_an_unscored_ycors_session_shows_its_total_without_cutoff_or_band() -> None:
    event = ors_scored(T, "c1", 1, 30.0, intake_total=None, instrument=OutcomeInstrument.YCORS).model_copy(
        update={"cutoff": None, "reliable_change_index": None, "intake_total": None, "change_from_intake": None,
                "change": None, "in_clinical_range": None, "flags": [], "triggers": [], "severity": None})
    series = rules.outcome_series(fold([event]), [], "ep-1")
    assert (series["cutoff"], series["reliable_change_band"], series["sessions"][0]["change"]) == (None, None, None)


def test_an_outcome_alert_is_marked_on_its_session_with_its_lifecycle() -> None:
    events = outcome_series(T, "c1", [20.0, 14.0])
    alert = alert_doc(outcome_alert_for(events[1]), acknowledged=True)
    series = rules.outcome_series(fold(events), [alert], "ep-1")
    assert series["sessions"][0]["alert"] is None
    mark = series["sessions"][1]["alert"]
    assert (mark["severity"], mark["triggers"], mark["status"]) == ("critical", ["reliable_deterioration"],
                                                                    "acknowledged")
    assert series["alerts"][0]["advice"].startswith("discuss with the client")


def test_an_episode_the_ors_record_lacks_gives_an_empty_series() -> None:
    series = rules.outcome_series(fold(outcome_series(T, "c1", [20.0])), [], "another")
    assert series["sessions"] == [] and series["latest_total"] is None and series["reliable_change_band"] is None


def srs_and_ors(srs_totals: list[float], ors_totals: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    srs = [scored(T, "c1", n, t, episode_id="ep-1") for n, t in enumerate(srs_totals, start=1)]
    return fold(srs), fold(outcome_series(T, "c1", ors_totals))


def test_the_trajectory_keeps_every_srs_field_as_it_was_and_adds_the_outcome_and_the_aligned_view() -> None:
    srs_doc, ors_doc = srs_and_ors([38.0, 36.0], [18.0, 21.0])
    before = rules.trajectory_view(srs_doc)
    view = rules.trajectory_view(srs_doc, (), None, ors_doc, ())
    assert {k: v for k, v in view.items() if k not in ("outcome", "aligned")} == {
        k: v for k, v in before.items() if k not in ("outcome", "aligned")}
    assert before["outcome"] is None and view["outcome"]["instrument"] == "ORS"
    TrajectoryOut.model_validate(view)
    TrajectoryOut.model_validate(before)


def test_the_aligned_view_pairs_both_scales_by_session_and_leaves_a_gap_where_one_is_missing() -> None:
    srs_doc, ors_doc = srs_and_ors([38.0, 36.0], [18.0, 21.0, 24.0])
    rows = rules.trajectory_view(srs_doc, (), None, ors_doc)["aligned"]
    assert [(r["episode_id"], r["session_number"]) for r in rows] == [("ep-1", 1), ("ep-1", 2), ("ep-1", 3)]
    assert [(r["srs"] or {}).get("total") for r in rows] == [38.0, 36.0, None]
    assert [r["ors"]["total"] for r in rows] == [18.0, 21.0, 24.0]
    assert rows[2]["srs"] is None and rows[1]["ors"]["change_from_intake"] == 3.0


def test_the_aligned_view_marks_both_kinds_of_alert_and_whether_the_outcome_was_at_risk() -> None:
    srs = [scored(T, "c1", 1, 38.0, episode_id="ep-1"),
           scored(T, "c1", 2, 30.0, episode_id="ep-1", previous_total=38.0)]
    alliance = deterioration_for(srs[1])
    assert alliance is not None
    alliance = alliance.model_copy(update={"outcome_at_risk": True, "severity": Severity.CRITICAL})
    ors = outcome_series(T, "c1", [20.0, 14.0])
    outcome = outcome_alert_for(ors[1])
    view = rules.trajectory_view(fold(srs), [alert_doc(alliance)], None, fold(ors), [alert_doc(outcome)])
    row = view["aligned"][1]
    assert (row["srs"]["alert"]["severity"], row["srs"]["alert"]["outcome_at_risk"]) == ("critical", True)
    assert row["ors"]["alert"]["triggers"] == ["reliable_deterioration"]
    assert view["aligned"][0]["srs"]["alert"] is None and view["aligned"][0]["ors"]["alert"] is None
    assert Flag.DROP_FROM_PREVIOUS in row["srs"]["alert"]["triggers"]
    TrajectoryOut.model_validate(view)



# A session across midnight UTC: its ORS (at the start) on one date, its SRS (at the end) on the
# next, so scoring derived each scale's episode with its own date (docs/outcome.md).
SRS_EPISODE, ORS_EPISODE = "auto/2026-03-03/1", "auto/2026-03-02/1"


def across_midnight(srs_totals: list[float], ors_totals: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    srs = [scored(T, "c1", n, t, episode_id=SRS_EPISODE, episode_derived=True)
           for n, t in enumerate(srs_totals, start=1)]
    return fold(srs), fold(outcome_series(T, "c1", ors_totals, episode_id=ORS_EPISODE))


def test_the_trajectory_shows_the_ors_series_of_a_session_across_utc_midnight_beside_its_srs() -> None:
    srs_doc, ors_doc = across_midnight([38.0, 36.0], [18.0, 21.0])
    view = rules.trajectory_view(srs_doc, (), None, ors_doc)
    assert (view["episode_id"], view["outcome"]["episode_id"]) == (SRS_EPISODE, ORS_EPISODE)
    assert [(r["session_number"], r["srs"]["total"], r["ors"]["total"]) for r in view["aligned"]] == [
        (1, 38.0, 18.0), (2, 36.0, 21.0)]


def test_derived_episodes_two_days_apart_are_not_shown_side_by_side() -> None:
    srs_doc = fold([scored(T, "c1", 1, 38.0, episode_id="auto/2026-03-04/1", episode_derived=True,
                           administered_at=datetime(2026, 3, 4, 9, 0, tzinfo=UTC))])
    ors_doc = fold(outcome_series(T, "c1", [18.0], episode_id=ORS_EPISODE,
                                  administered_at=datetime(2026, 3, 2, 9, 0, tzinfo=UTC)))
    assert rules.trajectory_view(srs_doc, (), None, ors_doc)["outcome"]["sessions"] == []


def test_the_fhir_bundle_of_a_session_across_utc_midnight_holds_its_ors_with_the_ors_episode_s_ids() -> None:
    srs_doc, ors_doc = across_midnight([38.0], [18.0])
    bundle = fhir.trajectory_bundle(srs_doc, None, ors_doc)
    ids_of = {r["resource"]["id"] for r in bundle["entry"]}
    alone = fhir.trajectory_bundle(ors_doc)  # the outcome-only client's Bundle of the same session
    assert {r["resource"]["id"] for r in alone["entry"]} < ids_of

# A form missing at the first session of an episode: the ORS begun at session 2 is its own derived
# episode (`auto/<the date of session 2>/2`) and still the same episode of care as the SRS's
# (docs/outcome.md): the sessions both scales hold are one session each.
SRS_FROM_1, ORS_FROM_2 = "auto/2026-01-05/1", "auto/2026-01-12/2"


def ors_begun_at_session_2(srs_totals: list[float], ors_totals: list[float],
                           days_late: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    srs = [scored(T, "c1", n, t, episode_id=SRS_FROM_1, episode_derived=True)
           for n, t in enumerate(srs_totals, start=1)]
    ors = [ors_scored(T, "c1", n, t, intake_total=ors_totals[0] if n > 2 else None, episode_id=ORS_FROM_2,
                      administered_at=BASE + timedelta(days=7 * (n - 1) + days_late, minutes=-50))
           for n, t in enumerate(ors_totals, start=2)]
    return fold(srs), fold(ors)


def test_the_trajectory_shows_the_ors_series_of_an_episode_whose_ors_began_at_session_2_beside_its_srs() -> None:
    srs_doc, ors_doc = ors_begun_at_session_2([38.0, 36.0, 35.0], [18.0, 21.0])
    view = rules.trajectory_view(srs_doc, (), None, ors_doc)
    assert (view["episode_id"], view["outcome"]["episode_id"]) == (SRS_FROM_1, ORS_FROM_2)
    assert [(r["session_number"], (r["srs"] or {}).get("total"), (r["ors"] or {}).get("total"))
            for r in view["aligned"]] == [(1, 38.0, None), (2, 36.0, 18.0), (3, 35.0, 21.0)]


def test_a_derived_ors_episode_whose_sessions_are_days_from_the_srs_ones_of_their_numbers_is_not_shown_beside_it(
) -> None:
    srs_doc, ors_doc = ors_begun_at_session_2([38.0, 36.0, 35.0], [18.0, 21.0], days_late=3)
    assert rules.trajectory_view(srs_doc, (), None, ors_doc)["outcome"]["sessions"] == []


def test_the_fhir_bundle_of_an_episode_whose_ors_began_at_session_2_holds_its_ors_sessions() -> None:
    srs_doc, ors_doc = ors_begun_at_session_2([38.0, 36.0], [18.0])
    bundle = fhir.trajectory_bundle(srs_doc, None, ors_doc)
    alone = fhir.trajectory_bundle(ors_doc)  # the outcome-only client's Bundle of the same session
    assert {r["resource"]["id"] for r in alone["entry"]} < {r["resource"]["id"] for r in bundle["entry"]}


def test_an_outcome_alert_superseded_by_scoring_shows_as_superseded() -> None:
    ors = outcome_series(T, "c1", [20.0, 14.0])
    alert = alert_doc(outcome_alert_for(ors[1]))
    alert["life"] = max(alert["life"], rules.life_key(1, AlertStatus.SUPERSEDED))
    mark = rules.outcome_series(fold(ors), [alert], "ep-1")["sessions"][1]["alert"]
    assert mark["status"] == "superseded"


def bundle_resources(srs_totals: list[float], ors_events: list[OrsScored]) -> list[dict[str, Any]]:
    srs = fold([scored(T, "c1", n, t, episode_id="ep-1") for n, t in enumerate(srs_totals, start=1)])
    return [e["resource"] for e in fhir.trajectory_bundle(srs, None, fold(ors_events))["entry"]]


def test_the_fhir_bundle_holds_an_ors_response_and_observation_per_session_after_the_srs_ones() -> None:
    resources = bundle_resources([38.0], outcome_series(T, "c1", [18.0, 24.0], items=ITEMS))
    codes = [r["code"]["coding"][0]["code"] for r in resources if r["resourceType"] == "Observation"]
    assert codes == ["SRS-total", "ORS-total", "ORS-total"]
    qr = [r for r in resources if r["resourceType"] == "QuestionnaireResponse"][1]
    assert qr["questionnaire"].endswith(":ORS")
    assert [i["linkId"] for i in qr["item"]] == ["individually", "interpersonally", "socially", "overall", "total"]


def test_an_ors_observation_carries_scoring_s_clinical_range_cutoff_and_change() -> None:
    resources = bundle_resources([38.0], outcome_series(T, "c1", [18.0, 26.0]))
    intake, latest = [r for r in resources if r["resourceType"] == "Observation"][1:]
    assert intake["interpretation"][0]["coding"][0]["code"] == "L"
    assert latest["interpretation"][0]["coding"][0]["code"] == "N"
    assert latest["referenceRange"] == [{"low": {"value": 25.0, "unit": "score", "system": fhir.UCUM,
                                                 "code": "{score}"}, "text": "clinical cutoff"}]
    ext = {e["url"].rsplit(":", 1)[-1]: next(v for k, v in e.items() if k.startswith("value"))
           for e in latest["extension"]}
    assert ext["reliable-change"] == "reliable_improvement" and ext["change-from-intake"] == 8.0
    assert ext["clinically-significant-improvement"] is True


def test_a_corrected_ors_session_keeps_its_fhir_ids_with_its_revision_as_version_and_amended() -> None:
    first = outcome_series(T, "c1", [18.0, 12.0])
    fix = corrected(first[1], 14.0, submission_id="ors-fix", supersedes=first[1].submission_id)
    before = [r for r in bundle_resources([38.0], first) if "ORS" in str(r.get("questionnaire", r.get("code")))]
    after = [r for r in bundle_resources([38.0], [*first, fix]) if "ORS" in str(r.get("questionnaire", r.get("code")))]
    assert [r["id"] for r in before] == [r["id"] for r in after]
    amended = [r for r in after if r["meta"]["versionId"] == "2"]
    assert len(amended) == 2 and {r["status"] for r in amended} == {"amended"}
    assert all(r["status"] in ("completed", "final") for r in after if r["meta"]["versionId"] == "1")


def test_ors_and_srs_resources_of_one_session_have_different_ids() -> None:
    resources = bundle_resources([38.0], outcome_series(T, "c1", [18.0]))
    assert len({r["id"] for r in resources}) == 4


def test_a_later_scored_time_of_an_ors_correction_is_the_bundle_timestamp() -> None:
    first = outcome_series(T, "c1", [18.0])
    fix = corrected(first[0], 19.0, administered_at=first[0].administered_at + timedelta(days=30))
    srs = fold([scored(T, "c1", 1, 38.0, episode_id="ep-1")])
    bundle = fhir.trajectory_bundle(srs, None, fold([*first, fix]))
    assert bundle["timestamp"] == fix.scored_at.isoformat()


# ---------------------------------------------------------------------------------------------
# Outcome indices: each outcome record's share of the counters, and the indices of a scope


def outcome_record(client: str, totals: list[float], **kw: Any) -> dict[str, Any]:
    return fold(outcome_series(T, client, totals, **kw))


def current_fields(record: dict[str, Any]) -> dict[str, int]:
    (fields,) = rules.contribution(record).values()
    return fields


def test_an_outcome_record_counts_by_its_latest_session_s_change_category() -> None:
    improved = current_fields(outcome_record("c1", [15.0, 18.0, 26.0]))
    assert improved == {"o_clients": 1, "o_improved": 1, "o_significant": 1, "o_change": 1100, "o_intake": 1500,
                        "o_intake_sq": 1500 * 1500}
    assert current_fields(outcome_record("c2", [20.0, 14.5]))["o_deteriorated"] == 1
    unchanged = current_fields(outcome_record("c3", [20.0, 24.9]))
    assert unchanged["o_unchanged"] == 1 and "o_significant" not in unchanged


def test_an_outcome_record_counts_in_its_clinician_s_current_bucket() -> None:
    record = outcome_record("c1", [15.0, 18.0], clinician_id="c-9", site_id="south")
    assert list(rules.contribution(record)) == [(T, "south", "c-9", "ORS", rules.CURRENT)]


def test_an_unscored_latest_session_adds_no_outcome_index() -> None:
    event = ors_scored(T, "c1", 1, 30.0, intake_total=None, instrument=OutcomeInstrument.YCORS).model_copy(
        update={"change": None, "intake_total": None, "change_from_intake": None})
    assert rules.contribution(fold([event])) == {}


def test_a_correction_moves_the_record_between_categories_and_back_exactly() -> None:
    first = outcome_series(T, "c1", [20.0, 14.0])
    before = rules.contribution(fold(first))
    after = rules.contribution(fold([*first, corrected(first[1], 26.0)]))
    moved = rules.diff(before, after)
    (fields,) = moved.values()
    assert fields == {"o_deteriorated": -1, "o_improved": 1, "o_significant": 1, "o_change": 1200}
    assert rules.total_counters([before, moved, rules.diff(after, before)]) == before


def oracle(intakes: list[float], latest: list[float]) -> tuple[float, float, float]:
    """Mean change, sample SD of the intakes and their ratio, the textbook way."""
    changes = [b - a for a, b in zip(intakes, latest, strict=True)]
    mean, sd = statistics.mean(changes), statistics.stdev(intakes)
    return round(mean, 2), round(sd, 2), round(mean / sd, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400)), min_size=2, max_size=12)
       .filter(lambda pairs: len({a for a, _ in pairs}) > 1))
def test_the_effect_size_is_the_mean_change_over_the_sample_sd_of_the_intakes(pairs: list[tuple[int, int]]) -> None:
    intakes, latest = [a / 10 for a, _ in pairs], [b / 10 for _, b in pairs]
    rows = [current_fields(outcome_record(f"c{i}", [a, b])) for i, (a, b) in enumerate(zip(intakes, latest,
                                                                                           strict=True))]
    got = rules.outcome_indices(rows)
    mean, sd, d = oracle(intakes, latest)
    assert got["clients"] == len(pairs)
    assert got["mean_change_from_intake"] == pytest.approx(mean, abs=0.011)
    assert got["intake_sd"] == pytest.approx(sd, abs=0.011)
    assert got["effect_size"] == pytest.approx(d, abs=0.011)


def test_shares_are_of_the_clients_with_a_scored_outcome() -> None:
    rows = [current_fields(outcome_record("a", [15.0, 21.0])), current_fields(outcome_record("b", [15.0, 26.0])),
            current_fields(outcome_record("c", [20.0, 14.0])), current_fields(outcome_record("d", [20.0, 21.0]))]
    got = rules.outcome_indices(rows)
    assert got["reliable_improvement"] == {"count": 2, "pct": 50.0}
    assert got["clinically_significant_improvement"] == {"count": 1, "pct": 25.0}
    assert got["reliable_deterioration"] == {"count": 1, "pct": 25.0}
    assert got["no_reliable_change"] == {"count": 1, "pct": 25.0}


def test_one_client_or_equal_intakes_give_no_effect_size() -> None:
    one = rules.outcome_indices([current_fields(outcome_record("a", [15.0, 21.0]))])
    assert (one["mean_change_from_intake"], one["intake_sd"], one["effect_size"]) == (6.0, None, None)
    same = rules.outcome_indices([current_fields(outcome_record(c, [15.0, 21.0])) for c in ("a", "b")])
    assert (same["intake_sd"], same["effect_size"]) == (0.0, None)
    assert rules.outcome_indices([])["clients"] == 0


def test_outcome_buckets_leave_the_alliance_indices_of_a_summary_as_they_were() -> None:
    srs = fold([scored(T, "c1", 1, 30.0), scored(T, "c1", 2, 33.0, previous_total=30.0)])
    alliance_rows = [{"instrument": "SRS", **current_fields_of(srs)}]
    ors_rows = [{"instrument": "ORS", **current_fields(outcome_record("c1", [15.0, 21.0]))}]
    alone = rules.summary_from_counters(alliance_rows, 0, 0)
    both = rules.summary_from_counters(alliance_rows + ors_rows, 0, 0)
    assert {k: v for k, v in both.items() if k != "outcome"} == {k: v for k, v in alone.items() if k != "outcome"}
    assert (alone["outcome"]["clients"], both["outcome"]["clients"]) == (0, 1)
    SummaryOut.model_validate({**both, "tenant_id": T, "site_id": None, "as_of": "2026-01-01T00:00:00Z"})


def current_fields_of(record: dict[str, Any]) -> dict[str, int]:
    return rules.contribution(record)[(T, "north", "c-1", "SRS", rules.CURRENT)]
