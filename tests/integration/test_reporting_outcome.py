"""The outcome half (ORS) through the reporting service as a process on the real local broker and
store: `ors.scored.v1`, `outcome.alert.v1` and `outcome.alert-status.v1` in, the trajectory (both
scales aligned by session), the FHIR bundle and the submission status out; and a rebuild that
replays the ORS topics too. Events are built with the real contract models."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from services.reporting.rebuild import rebuild
from services.reporting.settings import ReportingSettings
from shared.events import AlertStatus, DeadLetter, OrsSubmitted, Severity
from shared.ids import derive
from tests.integration.test_reporting_service import Reporting, reporting, reporting_process, tenant, until
from tests.support.browser import chromium, sign_in
from tests.support.outcome_events import (
    ors_scored,
    outcome_alert_for,
    outcome_series,
    outcome_status,
    publish_outcome,
)
from tests.support.reporting import counters_verified
from tests.support.wait import eventually
from tools.demo import deterioration_for, publish, scored

__all__ = ["reporting", "reporting_process"]  # the service module's fixtures: one process for this module
counters_agree_after_each_scenario = counters_verified()


def srs_sessions(t: str, client: str, totals: list[float]) -> list[Any]:
    out, previous = [], None
    for n, total in enumerate(totals, start=1):
        out.append(scored(t, client, n, total, episode_id="ep-1", previous_total=previous))
        previous = total
    return out


def has_ors(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda b: b["outcome"] is not None and len(b["outcome"]["sessions"]) == count


async def test_the_trajectory_returns_both_scales_aligned_by_session_as_scoring_scored_them(
        reporting: Reporting) -> None:
    t = tenant()
    srs = srs_sessions(t, "c1", [38.0, 36.0, 35.0])
    ors = outcome_series(t, "c1", [18.0, 21.0, 24.5, 26.0])
    await publish(reporting.ns.kafka(), srs)
    await publish_outcome(reporting.ns.kafka(), ors)
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key, lambda b: len(b["sessions"]) == 3 and has_ors(4)(b))
    outcome = body["outcome"]
    assert (outcome["instrument"], outcome["cutoff"], outcome["intake_total"]) == ("ORS", 25.0, 18.0)
    assert outcome["reliable_change_band"] == {"low": 13.0, "high": 23.0}
    latest = outcome["sessions"][-1]
    assert (latest["change_from_intake"], latest["change"], latest["clinically_significant_improvement"],
            latest["in_clinical_range"]) == (8.0, "reliable_improvement", True, False)
    assert [(r["session_number"], (r["srs"] or {}).get("total"), r["ors"]["total"]) for r in body["aligned"]] == [
        (1, 38.0, 18.0), (2, 36.0, 21.0), (3, 35.0, 24.5), (4, None, 26.0)]
    # the SRS fields are exactly what they were
    assert [s["total"] for s in body["sessions"]] == [38.0, 36.0, 35.0] and body["instrument"] == "SRS"


async def test_a_corrected_ors_session_shows_its_latest_revision_whatever_the_arrival_order(
        reporting: Reporting) -> None:
    t = tenant()
    ors = outcome_series(t, "c1", [20.0, 13.0])
    fix = ors_scored(t, "c1", 2, 19.0, intake_total=20.0, previous_total=20.0, revision=2,
                     submission_id=ors[1].submission_id, administered_at=ors[1].administered_at)
    await publish(reporting.ns.kafka(), srs_sessions(t, "c1", [38.0, 37.0]))
    await publish_outcome(reporting.ns.kafka(), [ors[0], fix, ors[1], fix])  # stale after newer, duplicate
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key,
                                 lambda b: has_ors(2)(b) and b["outcome"]["sessions"][1]["revision"] == 2)
    session = body["outcome"]["sessions"][1]
    assert (session["total"], session["change"]) == (19.0, "no_reliable_change")


async def test_alerts_of_both_kinds_are_marked_on_their_sessions_with_their_lifecycle(reporting: Reporting) -> None:
    t = tenant()
    srs = srs_sessions(t, "c1", [38.0, 30.0])
    alliance = deterioration_for(srs[1])
    assert alliance is not None
    alliance = alliance.model_copy(update={"outcome_at_risk": True, "severity": Severity.CRITICAL})
    ors = outcome_series(t, "c1", [20.0, 14.0])
    outcome = outcome_alert_for(ors[1])
    await publish(reporting.ns.kafka(), [*srs, alliance])
    await publish_outcome(reporting.ns.kafka(), [outcome_status(outcome, AlertStatus.ACKNOWLEDGED), *ors, outcome])
    key = await reporting.key(t)

    # The acknowledgement travels on the outcome status topic, the raise on the outcome alert topic:
    # reporting consumes the two apart, so the alert may be shown before its status is. Wait for both.
    def marked(b: dict[str, Any]) -> bool:
        return has_ors(2)(b) and len(b["aligned"]) == 2 and all(
            b["aligned"][1][scale] and b["aligned"][1][scale]["alert"] for scale in ("srs", "ors")) and (
            b["aligned"][1]["ors"]["alert"]["status"] == "acknowledged")

    body = await until(reporting, "/v1/clients/c1/trajectory", key, marked)
    row = body["aligned"][1]
    assert (row["srs"]["alert"]["severity"], row["srs"]["alert"]["outcome_at_risk"]) == ("critical", True)
    assert (row["ors"]["alert"]["triggers"], row["ors"]["alert"]["status"]) == (["reliable_deterioration"],
                                                                                "acknowledged")
    assert body["outcome"]["sessions"][1]["alert"]["alert_id"] == outcome.alert_id
    assert [a["alert_id"] for a in body["outcome"]["alerts"]] == [outcome.alert_id]
    assert [a["alert_id"] for a in body["alerts"]] == [alliance.alert_id]  # the SRS list holds alliance alerts only

    await publish_outcome(reporting.ns.kafka(), [outcome_status(outcome, AlertStatus.WITHDRAWN)])
    body = await until(reporting, "/v1/clients/c1/trajectory", key,
                                 lambda b: b["outcome"]["sessions"][1]["alert"]["status"] == "withdrawn")
    assert body["outcome"]["alerts"][0]["status"] == "withdrawn"


async def test_an_ors_submission_answers_its_status_scored_then_superseded(reporting: Reporting) -> None:
    t = tenant()
    first = ors_scored(t, "c1", 1, 18.0, intake_total=None, submission_id="ors-1")
    fix = ors_scored(t, "c1", 1, 19.0, intake_total=None, submission_id="ors-1b", supersedes="ors-1", revision=2,
                     administered_at=first.administered_at)
    await publish_outcome(reporting.ns.kafka(), [first])
    key = await reporting.key(t, role="submit")
    status = await until(reporting, "/v1/submissions/ors-1", key, lambda b: True)
    assert (status["status"], status["revision"], status["total"], status["client_id"]) == ("scored", 1, 18.0, "c1")
    await publish_outcome(reporting.ns.kafka(), [fix])
    status = await until(reporting, "/v1/submissions/ors-1", key, lambda b: b["status"] == "superseded")
    assert status["superseded_by"] == "ors-1b"
    assert (await until(reporting, "/v1/submissions/ors-1b", key, lambda b: True))["status"] == "scored"


async def test_a_dead_lettered_ors_submission_is_rejected_with_its_reason(reporting: Reporting) -> None:
    t = tenant()
    topics = reporting.ns.kafka().topics()
    at = datetime.now(UTC)
    submitted = OrsSubmitted(event_id=derive("ors-sub", t), tenant_id=t, occurred_at=at, submission_id="ors-gap",
                             site_id="north", clinician_id="c-1", client_id="c1", session_number=99,
                             administered_at=at, total=20.0, accepted_at=at)
    dead = DeadLetter(event_id=derive("dl", t), tenant_id=t, occurred_at=at, service="scoring", reason="session_gap",
                      detail="99 is more than 20 above 1", source_topic=topics.ors_submitted, source_partition=0,
                      source_offset=3, key=f"{t}:c1", payload=submitted.model_dump_json())
    await publish(reporting.ns.kafka(), [], raw=[(topics.deadletter, dead.model_dump_json().encode(), b"k")])
    status = await until(reporting, "/v1/submissions/ors-gap", await reporting.key(t, role="submit"), lambda b: True)
    assert (status["status"], status["reason"], status["session_number"]) == ("rejected", "session_gap", 99)


async def test_the_fhir_bundle_holds_the_ors_sessions_of_the_episode(reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), srs_sessions(t, "c1", [38.0]))
    await publish_outcome(reporting.ns.kafka(), outcome_series(t, "c1", [18.0, 24.0]))
    key = await reporting.key(t)
    # both scales visible (with the ORS alone the trajectory and the Bundle answer already)
    await until(reporting, "/v1/clients/c1/trajectory", key, lambda b: len(b["sessions"]) == 1 and has_ors(2)(b))
    res = await reporting.http.get("/v1/clients/c1/fhir", headers={"Authorization": f"Bearer {key}"})
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in res.json()["entry"]
             if e["resource"]["resourceType"] == "Observation"]
    assert codes == ["SRS-total", "ORS-total", "ORS-total"]


async def test_a_rebuild_replays_the_ors_topics_into_the_new_generation(reporting: Reporting) -> None:
    t = tenant()
    ors = outcome_series(t, "c1", [20.0, 14.0])
    outcome = outcome_alert_for(ors[1])
    await publish(reporting.ns.kafka(), srs_sessions(t, "c1", [38.0, 37.0]))
    await publish_outcome(reporting.ns.kafka(), [*ors, outcome])
    key = await reporting.key(t)
    before = await until(reporting, "/v1/clients/c1/trajectory", key,
                                   lambda b: has_ors(2)(b) and b["outcome"]["sessions"][1]["alert"] is not None)
    result = await rebuild(reporting.ns.kafka(), reporting.ns.mongo(), ReportingSettings(), idle_seconds=5)
    assert result.switched

    async def switched() -> dict[str, Any] | None:
        res = await reporting.http.get("/v1/clients/c1/trajectory", headers={"Authorization": f"Bearer {key}"})
        return res.json() if res.headers["x-reporting-generation"] == result.generation else None

    after = await eventually(switched, timeout=15)
    assert after["outcome"] == before["outcome"] and after["aligned"] == before["aligned"]


async def test_summaries_count_clients_by_their_latest_outcome_per_tenant_site_and_clinician(
        reporting: Reporting) -> None:
    t = tenant()
    # intakes 15, 20, 20, 25 (north: c1-c3 of clinician c-1; south: c4 of c-2)
    plans = {"c1": ([15.0, 21.0, 26.0], "north", "c-1"), "c2": ([20.0, 13.0], "north", "c-1"),
             "c3": ([20.0, 22.0], "north", "c-1"), "c4": ([25.0, 31.0], "south", "c-2")}
    events = [e for client, (totals, site, clinician) in plans.items()
              for e in outcome_series(t, client, totals, site_id=site, clinician_id=clinician)]
    await publish(reporting.ns.kafka(), [scored(t, "c1", 1, 38.0, episode_id="ep-1")])
    await publish_outcome(reporting.ns.kafka(), events)
    key = await reporting.key(t)
    tenant_view = await until(reporting, "/v1/summary", key, lambda b: b["outcome"]["clients"] == 4)
    outcome = tenant_view["outcome"]
    assert outcome["reliable_improvement"] == {"count": 2, "pct": 50.0}  # c1 (+11) and c4 (+6)
    assert outcome["clinically_significant_improvement"] == {"count": 1, "pct": 25.0}  # c1 crosses 25
    assert outcome["reliable_deterioration"] == {"count": 1, "pct": 25.0}
    assert outcome["no_reliable_change"] == {"count": 1, "pct": 25.0}
    assert outcome["mean_change_from_intake"] == 3.0  # (11 - 7 + 2 + 6) / 4
    assert (outcome["intake_sd"], outcome["effect_size"]) == (4.08, 0.73)  # sample SD of 15, 20, 20, 25
    assert tenant_view["clients"] == 1  # the alliance indices count the SRS record only
    site = await until(reporting, "/v1/sites/south/summary", key, lambda b: b["outcome"]["clients"] == 1)
    assert site["outcome"]["reliable_improvement"]["count"] == 1
    clinician = await until(reporting, "/v1/clinicians/c-1/summary", key, lambda b: b["outcome"]["clients"] == 3)
    assert (clinician["clinician_id"], clinician["outcome"]["mean_change_from_intake"]) == ("c-1", 2.0)

    # a correction moves a client between categories: counters follow, exactly once
    fix = ors_scored(t, "c2", 2, 21.0, intake_total=20.0, previous_total=20.0, revision=2,
                     submission_id=events[4].submission_id, administered_at=events[4].administered_at)
    await publish_outcome(reporting.ns.kafka(), [fix, fix])
    moved = await until(reporting, "/v1/clinicians/c-1/summary", key,
                        lambda b: b["outcome"]["reliable_deterioration"]["count"] == 0)
    assert moved["outcome"]["no_reliable_change"]["count"] == 2 and moved["outcome"]["clients"] == 3


async def test_a_client_with_only_ors_sessions_is_in_their_clinicians_caseload_with_the_outcome(
        reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), srs_sessions(t, "c1", [38.0, 30.0]))
    ors = outcome_series(t, "c2", [20.0, 14.0])
    await publish_outcome(reporting.ns.kafka(), [*ors, outcome_alert_for(ors[1])])
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clinicians/c-1/caseload", key,
                       lambda b: len(b["clients"]) == 2 and b["clients"][1]["outcome"]["alerts"] != [])
    srs, only_ors = body["clients"]
    assert (srs["client_id"], srs["latest_total"], srs["outcome"]) == ("c1", 30.0, None)
    assert (only_ors["client_id"], only_ors["instrument"], only_ors["latest_total"], only_ors["cutoff"],
            only_ors["points"], only_ors["at_risk"]) == ("c2", "SRS", None, None, [], False)
    outcome = only_ors["outcome"]
    assert (outcome["instrument"], outcome["latest_total"], outcome["change"], outcome["session_count"]) == (
        "ORS", 14.0, "reliable_deterioration", 2)
    assert outcome["alerts"] == [{"session_number": 2, "severity": "critical", "acknowledged": False,
                                  "status": "open"}]


async def test_the_caseload_pages_over_both_sources_once_each_client(reporting: Reporting) -> None:
    t = tenant()
    # c0, c2, c4: SRS (c2 at risk) and ORS; c1, c3: ORS only
    await publish(reporting.ns.kafka(), [*srs_sessions(t, "c0", [38.0]), *srs_sessions(t, "c2", [38.0, 30.0]),
                                         *srs_sessions(t, "c4", [38.0])])
    await publish_outcome(reporting.ns.kafka(), [e for c in ("c0", "c1", "c2", "c3", "c4")
                                                 for e in outcome_series(t, c, [20.0])])
    key = await reporting.key(t)
    await until(reporting, "/v1/clinicians/c-1/caseload", key, lambda b: len(b["clients"]) == 5, limit=50)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await reporting.get("/v1/clinicians/c-1/caseload", key, **params)).json()
        seen += [c["client_id"] for c in page["clients"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == ["c2", "c0", "c1", "c3", "c4"]


async def test_the_fhir_bundle_of_a_client_with_only_ors_sessions_holds_them(reporting: Reporting) -> None:
    t = tenant()
    await publish_outcome(reporting.ns.kafka(), outcome_series(t, "c1", [18.0, 24.0]))
    key = await reporting.key(t)
    await until(reporting, "/v1/clients/c1/trajectory", key, has_ors(2))
    res = await reporting.http.get("/v1/clients/c1/fhir", headers={"Authorization": f"Bearer {key}"})
    assert res.status_code == 200
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in res.json()["entry"]
             if e["resource"]["resourceType"] == "Observation"]
    assert codes == ["ORS-total", "ORS-total"]


async def test_the_dashboard_card_of_a_client_with_only_ors_sessions_shows_its_latest_ors(
        reporting: Reporting) -> None:
    t = tenant()
    ors = outcome_series(t, "c1", [20.0, 14.0])
    await publish_outcome(reporting.ns.kafka(), [*ors, outcome_alert_for(ors[1])])
    key = await reporting.key(t)
    await until(reporting, "/v1/clinicians/c-1/caseload", key,
                lambda b: len(b["clients"]) == 1 and b["clients"][0]["outcome"]["alerts"] != [])
    async with chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, reporting.proc.url, key, clinician="c-1")
        facts = page.locator("#cards li.card .facts")
        await facts.wait_for()
        assert await facts.inner_text() == ("no SRS session · ORS latest 14.0 (session 2) · reliable deterioration"
                                            " · 1 outcome alert")


async def test_a_site_bound_key_sees_only_its_sites_clients_with_only_ors_sessions(reporting: Reporting) -> None:
    t = tenant()
    await publish_outcome(reporting.ns.kafka(), [*outcome_series(t, "c1", [20.0]),
                                                 *outcome_series(t, "c2", [20.0], site_id="south")])
    await until(reporting, "/v1/clinicians/c-1/caseload", await reporting.key(t), lambda b: len(b["clients"]) == 2)
    north = (await reporting.get("/v1/clinicians/c-1/caseload", await reporting.key(t, site="north"))).json()
    assert [c["client_id"] for c in north["clients"]] == ["c1"]
    south = await reporting.key(t, site="south")
    assert (await reporting.get("/v1/clients/c1/fhir", south)).status_code == 404
