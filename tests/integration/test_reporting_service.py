"""The reporting service as a process on the real local broker and store.

Events go straight to its input topics (as scoring and alerts publish them); effects are read
through its HTTP API. One process serves the whole module (a start costs three group joins);
each test uses its own tenants.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from services.reporting import rules
from shared.auth import create_key
from shared.events import AlertStatus, AlertStatusChanged, DeadLetter, Instrument, Items, SrsScored, SrsSubmitted
from shared.ids import alert_event_id, derive
from shared.mongo import Document
from tests.support.deadletters import dead_letters
from tests.support.reporting import counters_verified
from tests.support.services import Namespace, ServiceProcess, service_fixture
from tests.support.wait import eventually
from tools.demo import (
    BASE,
    acknowledgement,
    deterioration_for,
    lifecycle,
    publish,
    revised,
    scored,
    transferred,
)

ITEMS = Items(relationship=9.0, goals=8.5, approach=9.0, overall=9.5)


@dataclass
class Reporting:
    ns: Namespace
    proc: ServiceProcess
    http: httpx.AsyncClient
    mongo: AsyncMongoClient[Document]

    async def key(self, tenant: str, role: str = "read", site: str | None = None) -> str:
        key, _ = await create_key(self.mongo[self.ns.database], tenant, role, site)  # type: ignore[arg-type]
        return key

    async def get(self, path: str, key: str, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params, headers={"Authorization": f"Bearer {key}"})


# Summaries uncached so each test sees its own writes at once.
# Exact reads: no summary cache, and a tenant roll-up served only when up to date with the counters
# (refreshed often, so that tenant reads do come from it).
reporting_process = service_fixture("reporting", extra_env={"ALLIANCE_REPORTING_SUMMARY_CACHE_SECONDS": "0",
                                                            "ALLIANCE_REPORTING_ROLLUP_MAX_AGE_SECONDS": "0",
                                                            "ALLIANCE_REPORTING_ROLLUP_REFRESH_SECONDS": "0.5"})


@pytest.fixture(scope="module")
async def reporting(namespace_m: Namespace, reporting_process: ServiceProcess) -> AsyncIterator[Reporting]:
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    async with httpx.AsyncClient(base_url=reporting_process.url, timeout=30) as http:
        yield Reporting(namespace_m, reporting_process, http, mongo)
    await mongo.close()


counters_agree_after_each_scenario = counters_verified()


def tenant() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def client_sessions(tenant_id: str, client: str, totals: list[float], **kw: Any) -> list[SrsScored]:
    events = []
    previous = None
    for n, total in enumerate(totals, start=1):
        events.append(scored(tenant_id, client, n, total, previous_total=previous, items=ITEMS if n % 2 else None,
                             **kw))
        previous = total
    return events


def untenanted(view: dict[str, Any]) -> dict[str, Any]:
    """A trajectory without its submission ids (the demo derives them from the tenant)."""
    sessions = [{k: v for k, v in s.items() if k != "submission_id"} for s in view["sessions"]]
    aligned = [{**row, "srs": row["srs"] and {k: v for k, v in row["srs"].items() if k != "submission_id"}}
               for row in view.get("aligned", [])]
    return {**view, "sessions": sessions, "aligned": aligned}


async def trajectory_of(r: Reporting, key: str, client: str, count: int, corrected: float | None = None,
                        **params: Any) -> dict[str, Any]:
    """The trajectory once it has `count` sessions (and, with `corrected`, once session 2 shows that
    total: its correction arrives as a separate event, possibly after all the sessions)."""
    async def check() -> dict[str, Any] | None:
        res = await r.get(f"/v1/clients/{client}/trajectory", key, **params)
        if res.status_code != 200:
            return None
        body: dict[str, Any] = res.json()
        if len(body["sessions"]) != count:
            return None
        return body if corrected is None or body["sessions"][1]["total"] == corrected else None

    return await eventually(check, timeout=60)


# ---------------------------------------------------------------------------------------------
# Materialization


async def test_shuffled_and_duplicated_events_give_the_same_trajectories_as_the_clean_stream(
        reporting: Reporting) -> None:
    clean_tenant, shuffled_tenant = tenant(), tenant()
    plan = {f"c{i}": [round(random.Random(i).uniform(28, 40), 1) for _ in range(2 + i % 5)] for i in range(8)}

    def stream(t: str) -> list[SrsScored]:
        out: list[SrsScored] = []
        for client, totals in plan.items():
            events = client_sessions(t, client, totals, site_id="north", clinician_id="c-1")
            out.extend(events)
            # a correction of session 2 under a new id, submitted an hour after the original
            if len(events) > 1:
                original = events[1]
                out.append(revised(original, submission_id=original.submission_id + "-fix", total=20.0,
                                   accepted_at=original.accepted_at + timedelta(hours=1)))
        return out

    clean = stream(clean_tenant)
    noisy = stream(shuffled_tenant)
    rng = random.Random(5)
    noisy = noisy + [rng.choice(noisy) for _ in range(len(noisy))]
    rng.shuffle(noisy)
    await publish(reporting.ns.kafka(), clean)
    await publish(reporting.ns.kafka(), noisy)
    clean_key, noisy_key = await reporting.key(clean_tenant), await reporting.key(shuffled_tenant)
    for client, totals in plan.items():
        fixed = 20.0 if len(totals) > 1 else None  # the correction wins in both
        a = await trajectory_of(reporting, clean_key, client, len(totals), fixed)
        b = await trajectory_of(reporting, noisy_key, client, len(totals), fixed)
        assert untenanted(a) == untenanted(b)
    # a redelivery after everything was applied changes nothing either
    await publish(reporting.ns.kafka(), noisy[: len(noisy) // 2])
    marker = scored(shuffled_tenant, "marker", 1, 38.0)
    await publish(reporting.ns.kafka(), [marker])
    await trajectory_of(reporting, noisy_key, "marker", 1)
    for client, totals in plan.items():
        a = await trajectory_of(reporting, clean_key, client, len(totals))
        assert untenanted(a) == untenanted(await trajectory_of(reporting, noisy_key, client, len(totals)))


async def test_an_out_of_order_session_lands_in_its_place(reporting: Reporting) -> None:
    t = tenant()
    events = client_sessions(t, "c1", [38.0, 37.0, 30.0, 33.0])
    await publish(reporting.ns.kafka(), [events[0], events[1], events[3]])
    key = await reporting.key(t)
    await trajectory_of(reporting, key, "c1", 3)
    await publish(reporting.ns.kafka(), [events[2]])
    body = await trajectory_of(reporting, key, "c1", 4)
    assert [s["session_number"] for s in body["sessions"]] == [1, 2, 3, 4]
    assert [s["change_from_previous"] for s in body["sessions"]] == [None, -1.0, -7.0, 3.0]
    assert body["latest_total"] == 33.0 and body["at_risk"]


async def test_a_poison_record_is_dead_lettered_and_the_partition_moves_on(reporting: Reporting) -> None:
    t = tenant()
    topics = reporting.ns.kafka().topics()
    key = f"{t}:c1".encode()
    bad_json = b"{not json"
    invalid = json.dumps({"tenant_id": t, "event_id": "x"}).encode()
    await publish(reporting.ns.kafka(), [], raw=[(topics.scored, bad_json, key), (topics.scored, invalid, key)])
    await publish(reporting.ns.kafka(), [scored(t, "c1", 1, 38.0)])  # same key: same partition, after the poison
    await trajectory_of(reporting, await reporting.key(t), "c1", 1)

    poison = {bad_json.decode(), invalid.decode()}
    async with dead_letters(reporting.ns.kafka()) as letters:
        seen = await letters.until(lambda seen: poison <= {d.payload for d in seen if d.service == "reporting"})
    mine = [d for d in seen if d.service == "reporting" and d.payload in poison]
    assert {d.reason for d in mine} == {"undecodable", "invalid"}
    assert all(d.source_topic == topics.scored and d.source_offset is not None for d in mine)


async def test_alerts_are_marked_and_acknowledgements_counted_whatever_arrives_first(reporting: Reporting) -> None:
    t = tenant()
    events = client_sessions(t, "c1", [38.0, 33.0], site_id="north")
    alert = deterioration_for(events[1])
    assert alert is not None
    ack = AlertStatusChanged(event_id=derive("ack", alert.alert_id), tenant_id=t, occurred_at=datetime.now(UTC),
                             alert_id=alert.alert_id, site_id="north", clinician_id=alert.clinician_id,
                             status="acknowledged")
    await publish(reporting.ns.kafka(), [ack])  # the acknowledgement before the alert itself
    await publish(reporting.ns.kafka(), [*events, alert, alert])
    key = await reporting.key(t)
    body = await trajectory_of(reporting, key, "c1", 2)

    async def marked() -> dict[str, Any] | None:
        b = (await reporting.get("/v1/clients/c1/trajectory", key)).json()
        return b if b["alerts"] and b["alerts"][0]["acknowledged"] else None

    body = await eventually(marked, timeout=30)
    assert [(a["alert_id"], a["session_number"]) for a in body["alerts"]] == [(alert.alert_id, 2)]
    # the counters follow the records they count (written after them): wait for them too
    summary = await until(reporting, "/v1/sites/north/summary", key, lambda b: b["alerts"]["acknowledged"] == 1)
    assert summary["alerts"] == {"raised": 1, "acknowledged": 1}


async def test_metrics_count_outcomes_and_scored_to_visible_latency(reporting: Reporting) -> None:
    t = tenant()
    e = scored(t, "c1", 1, 38.0)
    await publish(reporting.ns.kafka(), [e, e])
    await trajectory_of(reporting, await reporting.key(t), "c1", 1)

    async def families() -> dict[str, Any] | None:
        text = (await reporting.http.get("/metrics")).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        outcomes = {s.labels.get("outcome"): s.value for s in fams["alliance_reporting_events"].samples
                    if s.name.endswith("_total")}
        # Lag is measured by the runtime's monitor loop, every few seconds: wait for its first report too.
        lag = any(s.labels.get("service") == "reporting" for s in fams["alliance_consumer_lag_messages"].samples)
        return fams if lag and outcomes.get("applied", 0) >= 1 and outcomes.get("duplicate", 0) >= 1 else None

    fams = await eventually(families, timeout=30)
    visible = {s.name: s.value for s in fams["alliance_scored_to_visible_seconds"].samples}
    assert visible["alliance_scored_to_visible_seconds_count"] >= 1
    assert {s.name for s in fams["alliance_reporting_apply_seconds"].samples} >= {
        "alliance_reporting_apply_seconds_count"}


# ---------------------------------------------------------------------------------------------
# API: shapes, paging, caching, FHIR


async def test_trajectory_has_the_documented_shape(reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), client_sessions(t, "c1", [38.0, 35.0]))
    body = await trajectory_of(reporting, await reporting.key(t), "c1", 2, instrument="SRS")
    assert {"client_id", "instrument", "sessions", "latest_total", "at_risk"} <= set(body)
    assert body["client_id"] == "c1" and body["instrument"] == "SRS"
    s1, s2 = body["sessions"]
    assert set(s1) >= {"session_number", "administered_at", "total", "items", "change_from_previous", "flags"}
    assert s1["items"] == ITEMS.model_dump() and s2["items"] is None
    assert s2["change_from_previous"] == -3.0 and "below_cutoff" in s2["flags"]
    assert body["latest_total"] == 35.0 and body["at_risk"] is True


async def test_instruments_are_separate_and_unknown_instruments_are_rejected(reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), [scored(t, "c1", 1, 38.0), scored(t, "c1", 1, 30.0,
                                                                           instrument=Instrument.CSRS)])
    key = await reporting.key(t)
    assert (await trajectory_of(reporting, key, "c1", 1, instrument="CSRS"))["latest_total"] == 30.0
    assert (await trajectory_of(reporting, key, "c1", 1))["latest_total"] == 38.0
    res = await reporting.get("/v1/clients/c1/trajectory", key, instrument="PHQ9")
    assert res.status_code == 422 and res.json()["errors"][0]["field"] == "instrument"


async def test_etag_answers_304_until_the_trajectory_changes(reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), [scored(t, "c1", 1, 38.0)])
    key = await reporting.key(t)
    await trajectory_of(reporting, key, "c1", 1)
    first = await reporting.get("/v1/clients/c1/trajectory", key)
    tag = first.headers["etag"]
    assert first.headers["cache-control"].startswith("private, max-age=")
    again = await reporting.http.get("/v1/clients/c1/trajectory",
                                     headers={"Authorization": f"Bearer {key}", "If-None-Match": tag})
    assert again.status_code == 304 and again.headers["etag"] == tag and not again.content
    await publish(reporting.ns.kafka(), [scored(t, "c1", 2, 37.0)])
    await trajectory_of(reporting, key, "c1", 2)
    changed = await reporting.http.get("/v1/clients/c1/trajectory",
                                       headers={"Authorization": f"Bearer {key}", "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag


async def test_caseload_pages_with_a_cursor_at_risk_clients_first(reporting: Reporting) -> None:
    t = tenant()
    totals = {"a": 38.0, "b": 30.0, "c": 39.0, "d": 31.0, "e": 37.5}
    await publish(reporting.ns.kafka(), [scored(t, c, 1, v, clinician_id="c-7") for c, v in totals.items()])
    key = await reporting.key(t)
    for client in totals:  # clients are in different partitions: one being visible says nothing of the others
        await trajectory_of(reporting, key, client, 1)
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await reporting.get("/v1/clinicians/c-7/caseload", key, **params)).json()
        pages.append(body["clients"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    entries = [c for page in pages for c in page]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [(c["client_id"], c["at_risk"]) for c in entries] == [
        ("b", True), ("d", True), ("a", False), ("c", False), ("e", False)]
    assert entries[0]["points"] == [{"session_number": 1, "total": 30.0, "below_cutoff": True}]
    assert entries[0]["cutoff"] == 36.0 and entries[0]["episode_count"] == 1
    bad = await reporting.get("/v1/clinicians/c-7/caseload", key, cursor="garbage!")
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


async def test_summaries_follow_the_pcoms_indices(reporting: Reporting) -> None:
    t = tenant()
    events = [*client_sessions(t, "c1", [30.0, 34.0], site_id="north"),  # below cutoff twice, at risk
              *client_sessions(t, "c2", [38.0, 39.0, 39.5], site_id="north"),
              *client_sessions(t, "k1", [37.0], site_id="south", instrument=Instrument.CSRS)]
    await publish(reporting.ns.kafka(), events)
    key = await reporting.key(t)
    await trajectory_of(reporting, key, "k1", 1, instrument="CSRS")
    await trajectory_of(reporting, key, "c2", 3)
    await trajectory_of(reporting, key, "c1", 2)
    # the counters follow the records they count (written after them): wait for them too
    s = await until(reporting, "/v1/summary", key, lambda b: b["sessions"] == 6)
    assert (s["clients"], s["sessions"], s["clients_at_risk"]) == (3, 6, 1)
    assert s["mean_first_session_total"] == round((30 + 38 + 37) / 3, 2)
    assert s["mean_latest_total"] == round((34 + 39.5 + 37) / 3, 2)
    assert s["pct_sessions_below_cutoff"] == round(100 * 2 / 6, 1)
    assert s["mean_sessions_per_client"] == 2.0
    assert [(b["age_band"], b["clients"], b["sessions"]) for b in s["by_age_band"]] == [("13+", 2, 5), ("6-12", 1, 1)]
    north = (await reporting.get("/v1/sites/north/summary", key)).json()
    assert (north["site_id"], north["clients"], north["sessions"]) == ("north", 2, 5)
    assert datetime.fromisoformat(s["as_of"]) <= datetime.now(UTC)


async def test_trends_give_the_monthly_series_of_a_tenant_a_site_and_a_clinician(reporting: Reporting) -> None:
    t = tenant()
    y = BASE.year
    march = [scored(t, "c1", n, total, administered_at=datetime(y, 3, 2 + n, tzinfo=UTC))
             for n, total in ((1, 30.0), (2, 34.0))]
    april = [scored(t, "c1", 3, 37.0, administered_at=datetime(y, 4, 6, tzinfo=UTC)),
             scored(t, "c2", 1, 39.0, site_id="south", clinician_id="c-2",
                    administered_at=datetime(y, 4, 9, tzinfo=UTC))]
    await publish(reporting.ns.kafka(), [*march, *april])
    key = await reporting.key(t)
    await trajectory_of(reporting, key, "c1", 3)
    await trajectory_of(reporting, key, "c2", 1)
    span = {"from": f"{y}-03", "to": f"{y}-05"}
    whole = await until(reporting, "/v1/summary/trends", key,  # the counters follow the records
                        lambda b: sum(m["sessions"] for m in b["months"]) == 4, **span)
    assert [(m["month"], m["sessions"], m["clients_seen"]) for m in whole["months"]] == [
        (f"{y}-03", 2, 1), (f"{y}-04", 2, 2), (f"{y}-05", 0, 0)]
    assert whole["months"][0]["pct_sessions_below_cutoff"] == 100.0
    assert whole["months"][1]["mean_change_first_to_latest"] == round(((37.0 - 30.0) + 0.0) / 2, 2)
    south = (await reporting.get("/v1/sites/south/trends", key, **span)).json()
    assert [m["sessions"] for m in south["months"]] == [0, 1, 0]
    c1 = (await reporting.get("/v1/clinicians/c-1/trends", key, **span)).json()
    assert [m["sessions"] for m in c1["months"]] == [2, 1, 0]


async def test_trends_count_alerts_raised_and_acknowledged_with_the_median_time_to_acknowledge(
        reporting: Reporting) -> None:
    t = tenant()
    y = BASE.year
    alerts = []
    for client in ("c1", "c2", "c3"):
        events = client_sessions(t, client, [38.0, 30.0], site_id="north")
        alert = deterioration_for(events[1])
        assert alert is not None and rules.month_of(alert.occurred_at) == f"{y}-01"
        alerts.append(alert)
        await publish(reporting.ns.kafka(), [*events, alert])
    a, b, c = alerts
    again = a.model_copy(update={"revision": 2, "event_id": alert_event_id(a.alert_id, 2)})
    await publish(reporting.ns.kafka(), [again, acknowledgement(a, a.occurred_at + timedelta(hours=2)),
                                         acknowledgement(b, b.occurred_at + timedelta(hours=4)),
                                         lifecycle(c, AlertStatus.WITHDRAWN)])
    key = await reporting.key(t)

    async def counted() -> dict[str, Any] | None:
        body = (await reporting.get("/v1/summary/trends", key, **{"from": f"{y}-01", "to": f"{y}-01"})).json()
        month: dict[str, Any] = body["months"][0]
        return month if (month["alerts_raised"], month["alerts_acknowledged"]) == (3, 2) else None

    month = await eventually(counted, timeout=30)
    assert month is not None
    middle = (rules.ack_bin_value(rules.ack_bin(2 * 3600)) + rules.ack_bin_value(rules.ack_bin(4 * 3600))) / 2
    assert month["median_seconds_to_acknowledge"] == round(middle, 1)
    assert abs(month["median_seconds_to_acknowledge"] - 3 * 3600) <= 0.091 * 3 * 3600


async def test_trends_refuse_a_backwards_or_malformed_span_and_scope_site_bound_keys(reporting: Reporting) -> None:
    t = tenant()
    key, north = await reporting.key(t), await reporting.key(t, site="north")
    assert (await reporting.get("/v1/summary/trends", key, **{"from": "2026-05", "to": "2026-04"})).status_code == 422
    assert (await reporting.get("/v1/summary/trends", key, **{"from": "2026-13", "to": "2026-14"})).status_code == 422
    span = {"from": "2026-01", "to": "2026-02"}
    assert (await reporting.get("/v1/summary/trends", north, **span)).status_code == 403
    assert (await reporting.get("/v1/sites/south/trends", north, **span)).status_code == 403
    assert (await reporting.get("/v1/clinicians/c-1/trends", north, **span)).json()["site_id"] == "north"


async def test_fhir_view_is_a_bundle_of_responses_and_survey_observations(reporting: Reporting) -> None:
    t = tenant()
    await publish(reporting.ns.kafka(), client_sessions(t, "c1", [38.0, 35.0]))
    key = await reporting.key(t)
    await trajectory_of(reporting, key, "c1", 2)
    res = await reporting.get("/v1/clients/c1/fhir", key)
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/fhir+json")
    bundle = res.json()
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert bundle["resourceType"] == "Bundle" and kinds.count("QuestionnaireResponse") == 2
    assert kinds.count("Observation") == 2
    obs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert all(o["category"][0]["coding"][0]["code"] == "survey" for o in obs)
    assert [o["valueQuantity"]["value"] for o in obs] == [38.0, 35.0]


# ---------------------------------------------------------------------------------------------
# Isolation: two tenants, two sites, every endpoint


@dataclass
class World:
    a: str
    b: str
    key_a: str
    key_a_north: str
    key_b: str
    key_a_submit: str


@pytest.fixture(scope="module")
async def world(reporting: Reporting) -> World:
    a, b = tenant(), tenant()
    events = [
        *client_sessions(a, "shared-id", [38.0, 30.0], site_id="north", clinician_id="doc"),
        *client_sessions(a, "a-south", [37.0], site_id="south", clinician_id="doc"),
        *client_sessions(a, "a-only", [39.0], site_id="north", clinician_id="a-doc"),
        *client_sessions(b, "shared-id", [20.0], site_id="north", clinician_id="b-doc"),
    ]
    await publish(reporting.ns.kafka(), events)
    w = World(a, b, await reporting.key(a), await reporting.key(a, site="north"), await reporting.key(b),
              await reporting.key(a, role="submit"))
    for key, client, n in ((w.key_a, "shared-id", 2), (w.key_a, "a-south", 1), (w.key_a, "a-only", 1),
                           (w.key_b, "shared-id", 1)):
        await trajectory_of(reporting, key, client, n)
    return w


ENDPOINTS = ["/v1/clients/shared-id/trajectory", "/v1/clients/shared-id/fhir", "/v1/clinicians/doc/caseload",
             "/v1/sites/north/summary", "/v1/summary", "/v1/sites"]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_every_endpoint_needs_a_key(reporting: Reporting, world: World, path: str) -> None:
    assert (await reporting.http.get(path)).status_code == 401
    assert (await reporting.get(path, "ak_not-a-key")).status_code == 401


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_every_endpoint_needs_the_read_role(reporting: Reporting, world: World, path: str) -> None:
    assert (await reporting.get(path, world.key_a_submit)).status_code == 403


@pytest.mark.parametrize("kind", ["trajectory", "fhir"])
async def test_another_tenants_client_is_a_404_exactly_like_an_unknown_one(
        reporting: Reporting, world: World, kind: str) -> None:
    foreign = await reporting.get(f"/v1/clients/a-only/{kind}", world.key_b)
    unknown = await reporting.get(f"/v1/clients/nobody-{uuid.uuid4().hex}/{kind}", world.key_b)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.content == unknown.content


@pytest.mark.parametrize("kind", ["trajectory", "fhir"])
async def test_the_same_client_id_in_two_tenants_never_mixes(reporting: Reporting, world: World, kind: str) -> None:
    a = (await reporting.get(f"/v1/clients/shared-id/{kind}", world.key_a)).json()
    b = (await reporting.get(f"/v1/clients/shared-id/{kind}", world.key_b)).json()
    assert a != b
    text_b = json.dumps(b)
    assert world.a not in text_b and "30.0" not in text_b


@pytest.mark.parametrize("kind", ["trajectory", "fhir"])
async def test_a_site_bound_key_sees_no_client_of_another_site(reporting: Reporting, world: World, kind: str) -> None:
    assert (await reporting.get(f"/v1/clients/shared-id/{kind}", world.key_a_north)).status_code == 200
    other_site = await reporting.get(f"/v1/clients/a-south/{kind}", world.key_a_north)
    unknown = await reporting.get(f"/v1/clients/nobody-{uuid.uuid4().hex}/{kind}", world.key_a_north)
    assert other_site.status_code == 404 and other_site.content == unknown.content


async def test_caseload_is_tenant_and_site_scoped(reporting: Reporting, world: World) -> None:
    full = (await reporting.get("/v1/clinicians/doc/caseload", world.key_a)).json()
    assert sorted(c["client_id"] for c in full["clients"]) == ["a-south", "shared-id"]
    north = (await reporting.get("/v1/clinicians/doc/caseload", world.key_a_north)).json()
    assert [c["client_id"] for c in north["clients"]] == ["shared-id"]
    assert (await reporting.get("/v1/clinicians/doc/caseload", world.key_b)).status_code == 404
    assert (await reporting.get("/v1/clinicians/b-doc/caseload", world.key_a)).status_code == 404


async def test_site_summary_is_tenant_and_site_scoped(reporting: Reporting, world: World) -> None:
    a_north = (await reporting.get("/v1/sites/north/summary", world.key_a)).json()
    b_north = (await reporting.get("/v1/sites/north/summary", world.key_b)).json()
    assert (a_north["clients"], a_north["sessions"]) == (2, 3)
    assert (b_north["clients"], b_north["sessions"]) == (1, 1)
    assert (await reporting.get("/v1/sites/north/summary", world.key_a_north)).json()["clients"] == 2
    forbidden = await reporting.get("/v1/sites/south/summary", world.key_a_north)
    assert forbidden.status_code == 403
    assert (await reporting.get("/v1/sites/south/summary", world.key_b)).status_code == 404


async def test_the_sites_list_is_tenant_scoped_and_a_site_bound_key_sees_its_site_only(
        reporting: Reporting, world: World) -> None:
    assert (await reporting.get("/v1/sites", world.key_a)).json() == {
        "tenant_id": world.a, "bound_to": None, "sites": ["north", "south"]}
    assert (await reporting.get("/v1/sites", world.key_b)).json()["sites"] == ["north"]
    assert (await reporting.get("/v1/sites", world.key_a_north)).json() == {
        "tenant_id": world.a, "bound_to": "north", "sites": ["north"]}


async def test_tenant_summary_is_tenant_scoped_and_closed_to_site_bound_keys(
        reporting: Reporting, world: World) -> None:
    a = (await reporting.get("/v1/summary", world.key_a)).json()
    b = (await reporting.get("/v1/summary", world.key_b)).json()
    assert (a["tenant_id"], a["clients"], a["sessions"]) == (world.a, 3, 4)
    assert (b["tenant_id"], b["clients"], b["sessions"]) == (world.b, 1, 1)
    assert (await reporting.get("/v1/summary", world.key_a_north)).status_code == 403


# ---------------------------------------------------------------------------------------------
# Clinical records: corrections, episodes, transfers, rejections, the alert lifecycle


async def until(r: Reporting, path: str, key: str, accept: Any, **params: Any) -> dict[str, Any]:
    """The body of `path` once `accept(body)` holds."""
    async def check() -> dict[str, Any] | None:
        res = await r.get(path, key, **params)
        if res.status_code != 200:
            return None
        body: dict[str, Any] = res.json()
        return body if accept(body) else None

    return await eventually(check, timeout=60)


async def test_a_correction_under_the_same_submission_id_shows_the_new_items_with_their_total(
        reporting: Reporting) -> None:
    t = tenant()
    first = client_sessions(t, "c1", [38.0])[0]
    wrong = scored(t, "c1", 2, 36.0, submission_id="n-2", items=ITEMS, previous_total=38.0)
    fixed_items = Items(relationship=8.0, goals=8.0, approach=8.0, overall=8.0)
    fixed = revised(wrong, items=fixed_items, total=32.0)
    await publish(reporting.ns.kafka(), [fixed, first, wrong, fixed])  # the correction may come first
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key,
                       lambda b: len(b["sessions"]) == 2 and b["sessions"][1]["revision"] == 2)
    s = body["sessions"][1]
    assert (s["submission_id"], s["items"], s["total"]) == ("n-2", fixed_items.model_dump(), 32.0)
    assert sum(s["items"].values()) == s["total"]
    assert s["flags"] == fixed.flags and "below_cutoff" in s["flags"] and body["at_risk"]
    status = await until(reporting, "/v1/submissions/n-2", key, lambda b: b["revision"] == 2)
    assert (status["status"], status["total"], status["session_number"]) == ("scored", 32.0, 2)


async def test_a_correction_under_a_new_id_replaces_the_session_and_the_old_submission_is_superseded(
        reporting: Reporting) -> None:
    t = tenant()
    first, second = client_sessions(t, "c1", [38.0, 30.0])
    old = second.model_copy(update={"submission_id": "old-2"})
    new = revised(old, submission_id="new-2", total=37.5, accepted_at=old.accepted_at + timedelta(hours=1))
    await publish(reporting.ns.kafka(), [first, new, old])  # the replaced version arrives last
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key,
                       lambda b: [s["submission_id"] for s in b["sessions"]] == [first.submission_id, "new-2"])
    assert body["sessions"][1]["total"] == 37.5 and body["sessions"][1]["revision"] == 2
    superseded = await until(reporting, "/v1/submissions/old-2", key, lambda b: b["status"] == "superseded")
    assert (superseded["superseded_by"], superseded["revision"]) == ("new-2", 1)
    assert (await until(reporting, "/v1/submissions/new-2", key, lambda b: True))["status"] == "scored"
    # FHIR: the corrected session keeps its resource ids, amended, version 2
    bundle = (await reporting.get("/v1/clients/c1/fhir", key)).json()
    obs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [(o["status"], o["meta"]["versionId"]) for o in obs] == [("final", "1"), ("amended", "2")]


async def test_two_episodes_are_listed_and_episode_id_reads_the_older_one(reporting: Reporting) -> None:
    t = tenant()
    spring = "auto/2025-03-03/1"
    older = [scored(t, "c1", n, total, episode_id=spring, episode_derived=True, clinician_id="c-old",
                    administered_at=BASE - timedelta(days=300 - 7 * n)) for n, total in ((1, 30.0), (2, 31.0))]
    current = client_sessions(t, "c1", [38.0, 38.5, 39.0], episode_id="course-2")
    await publish(reporting.ns.kafka(), [*current, *older])
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key, lambda b: len(b["episodes"]) == 2)
    assert body["episode_id"] == "course-2" and len(body["sessions"]) == 3 and not body["at_risk"]
    assert [(e["episode_id"], e["session_count"], e["derived"]) for e in body["episodes"]] == [
        ("course-2", 3, False), (spring, 2, True)]
    past = (await reporting.get("/v1/clients/c1/trajectory", key, episode_id=spring)).json()
    assert (past["episode_id"], [s["total"] for s in past["sessions"]], past["clinician_id"]) == (
        spring, [30.0, 31.0], "c-old")
    assert past["at_risk"] and past["episodes"] == body["episodes"]
    fhir = (await reporting.get("/v1/clients/c1/fhir", key, episode_id=spring)).json()
    assert len(fhir["entry"]) == 4
    unknown = await reporting.get("/v1/clients/c1/trajectory", key, episode_id="nope")
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["field"] == "episode_id"
    # caseloads and summaries use the current episode
    caseload = (await reporting.get(f"/v1/clinicians/{current[0].clinician_id}/caseload", key)).json()
    assert [(c["episode_id"], c["session_count"], c["episode_count"]) for c in caseload["clients"]] == [
        ("course-2", 3, 2)]
    assert (await reporting.get("/v1/clinicians/c-old/caseload", key)).status_code == 404
    summary = (await reporting.get("/v1/summary", key)).json()
    assert (summary["sessions"], summary["mean_first_session_total"]) == (3, 38.0)


async def test_a_transferred_client_is_read_by_the_new_sites_key_and_not_the_old_ones(
        reporting: Reporting) -> None:
    t = tenant()
    before = client_sessions(t, "c1", [38.0, 37.5], site_id="north")
    north, south = await reporting.key(t, site="north"), await reporting.key(t, site="south")
    await publish(reporting.ns.kafka(), before)
    await until(reporting, "/v1/clients/c1/trajectory", north, lambda b: len(b["sessions"]) == 2)
    await publish(reporting.ns.kafka(), transferred(before, "south"))
    moved = await until(reporting, "/v1/clients/c1/trajectory", south, lambda b: len(b["sessions"]) == 2)
    assert moved["site_id"] == "south" and [s["revision"] for s in moved["sessions"]] == [2, 2]
    for kind in ("trajectory", "fhir"):
        gone = await reporting.get(f"/v1/clients/c1/{kind}", north)
        unknown = await reporting.get(f"/v1/clients/nobody/{kind}", north)
        assert gone.status_code == 404 and gone.content == unknown.content
    assert (await reporting.get(f"/v1/submissions/{before[0].submission_id}", north)).status_code == 404
    assert (await reporting.get(f"/v1/submissions/{before[0].submission_id}", south)).json()["status"] == "scored"
    assert (await reporting.get("/v1/sites/south/summary", await reporting.key(t))).json()["clients"] == 1
    # a straggler of the old site scored before the transfer does not take the client back
    await publish(reporting.ns.kafka(), before)
    await publish(reporting.ns.kafka(), [scored(t, "marker", 1, 38.0, site_id="south")])
    await until(reporting, "/v1/clients/marker/trajectory", south, lambda b: True)
    assert (await reporting.get("/v1/clients/c1/trajectory", south)).status_code == 200


def _dead_letter(kafka_topics: Any, submitted: SrsSubmitted, reason: str, detail: str) -> DeadLetter:
    return DeadLetter(event_id=derive("dl", submitted.submission_id, reason), tenant_id=submitted.tenant_id,
                      occurred_at=datetime.now(UTC), service="scoring", reason=reason, detail=detail,
                      source_topic=kafka_topics.submitted, source_partition=0, source_offset=7,
                      key=f"{submitted.tenant_id}:{submitted.client_id}", payload=submitted.model_dump_json())


def _submission(t: str, sid: str, client: str, number: int, site: str = "north") -> SrsSubmitted:
    at = datetime.now(UTC)
    return SrsSubmitted(event_id=derive("sub", sid), tenant_id=t, occurred_at=at, submission_id=sid, site_id=site,
                        clinician_id="c-1", client_id=client, session_number=number, administered_at=at,
                        total=35.0, accepted_at=at)


async def test_a_dead_lettered_submission_is_rejected_with_its_reason_and_listed(reporting: Reporting) -> None:
    t, other = tenant(), tenant()
    topics = reporting.ns.kafka().topics()
    gap = _submission(t, "typo", "c1", 100000)
    conflict = _submission(t, "south-1", "c1", 2, site="south")
    foreign = _dead_letter(topics, _submission(t, "not-mine", "c1", 1), "undecodable", "x").model_copy(
        update={"source_topic": topics.scored})
    raw = [(topics.deadletter, b"\x00 not a dead letter", None),
           (topics.deadletter, _dead_letter(topics, gap, "session_gap", "100000 is more than 20 above 1")
            .model_dump_json().encode(), b"k"),
           (topics.deadletter, foreign.model_dump_json().encode(), b"k"),
           (topics.deadletter, _dead_letter(topics, conflict, "site_conflict", "c1 belongs to north")
            .model_dump_json().encode(), b"k")]
    await publish(reporting.ns.kafka(), [], raw=raw)
    read, submit = await reporting.key(t), await reporting.key(t, role="submit")
    status = await until(reporting, "/v1/submissions/typo", submit, lambda b: True)
    assert (status["status"], status["reason"], status["detail"]) == (
        "rejected", "session_gap", "100000 is more than 20 above 1")
    assert (status["client_id"], status["session_number"], status["revision"]) == ("c1", 100000, None)
    page = await until(reporting, "/v1/submissions", read, lambda b: len(b["submissions"]) == 2,
                       status="rejected", since="2020-01-01T00:00:00Z")
    assert [(s["submission_id"], s["reason"]) for s in page["submissions"]] == [
        ("typo", "session_gap"), ("south-1", "site_conflict")]
    first = (await reporting.get("/v1/submissions", read, limit=1)).json()
    assert [s["submission_id"] for s in first["submissions"]] == ["typo"] and first["next_cursor"]
    second = (await reporting.get("/v1/submissions", read, limit=1, cursor=first["next_cursor"])).json()
    assert [s["submission_id"] for s in second["submissions"]] == ["south-1"] and second["next_cursor"] is None
    later = (await reporting.get("/v1/submissions", read, since=datetime.now(UTC).isoformat())).json()
    assert later == {"submissions": [], "next_cursor": None}
    # a dead letter of another topic is not a rejection; neither tenant nor site sees another's
    unknown = await reporting.get("/v1/submissions/never-posted", read)
    assert unknown.status_code == 404
    assert (await reporting.get("/v1/submissions/not-mine", read)).content == unknown.content
    other_tenant = await reporting.key(other)
    assert (await reporting.get("/v1/submissions/typo", other_tenant)).content == (
        await reporting.get("/v1/submissions/never-posted", other_tenant)).content
    assert (await reporting.get("/v1/submissions", other_tenant)).json()["submissions"] == []
    north = await reporting.key(t, site="north")
    assert (await reporting.get("/v1/submissions/south-1", north)).status_code == 404
    assert [s["submission_id"] for s in (await reporting.get("/v1/submissions", north)).json()["submissions"]] == [
        "typo"]
    assert (await reporting.get("/v1/submissions", read, cursor="garbage!")).status_code == 422
    assert (await reporting.http.get("/v1/submissions/typo")).status_code == 401
    # the garbage was skipped and counted, not dead-lettered again
    text = (await reporting.http.get("/metrics")).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    outcomes = {s.labels["outcome"]: s.value for s in fams["alliance_reporting_dead_letters"].samples
                if s.name.endswith("_total")}
    assert outcomes["unparseable"] >= 1 and outcomes["ignored"] >= 1 and outcomes["recorded"] >= 2


async def test_an_alert_withdrawn_by_a_status_event_shows_withdrawn(reporting: Reporting) -> None:
    t = tenant()
    events = client_sessions(t, "c1", [38.0, 33.0])
    alert = deterioration_for(events[1])
    assert alert is not None
    withdrawn = lifecycle(alert, "withdrawn")
    await publish(reporting.ns.kafka(), [withdrawn])  # the withdrawal before the alert
    await publish(reporting.ns.kafka(), [*events, alert, acknowledgement(alert)])
    key = await reporting.key(t)
    body = await until(reporting, "/v1/clients/c1/trajectory", key,
                       lambda b: b["alerts"] and b["alerts"][0]["acknowledged"])
    (shown,) = body["alerts"]
    assert (shown["alert_id"], shown["status"], shown["revision"], shown["severity"]) == (
        alert.alert_id, "withdrawn", 1, alert.severity)
    # a correction that still triggers raises it again (revision 2): open, acknowledgement kept
    again = deterioration_for(revised(events[1], total=31.0))
    assert again is not None and again.revision == 2
    await publish(reporting.ns.kafka(), [again])
    body = await until(reporting, "/v1/clients/c1/trajectory", key, lambda b: b["alerts"][0]["revision"] == 2)
    assert (body["alerts"][0]["status"], body["alerts"][0]["severity"]) == ("acknowledged", again.severity)
    caseload = (await reporting.get(f"/v1/clinicians/{alert.clinician_id}/caseload", key)).json()
    assert caseload["clients"][0]["alerts"] == [{"session_number": 2, "severity": again.severity,
                                                 "acknowledged": True, "status": "acknowledged"}]
