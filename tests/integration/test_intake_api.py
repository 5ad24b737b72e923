"""Intake through HTTP (in-process ASGI app) against the real local broker and store: every rule of
the API, and the event each accepted submission becomes on `srs.submitted.v1` (an outcome rating:
on `ors.submitted.v1`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.intake.app import IntakeConfig, create_app
from services.intake.csvformat import session_submission_id
from services.intake.settings import IntakeSettings
from shared import auth, ids
from shared.events import CLIENT_TRANSFER, RECORD_TYPE_HEADER, ClientTransfer, OrsSubmitted, SrsSubmitted
from shared.kafka import InboundRecord
from shared.logs import JsonFormatter
from shared.mongo import Document
from tests.support.bodies import changed
from tests.support.services import Namespace
from tests.support.wait import eventually
from tools.recorder import TopicRecorder

pytestmark = pytest.mark.asyncio(loop_scope="session")


def submission(**over: Any) -> dict[str, Any]:
    """A valid submission; keyword arguments replace (or, with value ..., remove) fields."""
    return changed({
        "instrument": "SRS", "client_id": "p-8812", "clinician_id": "c-17", "site_id": "north",
        "session_number": 3, "administered_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "items": {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8},
    }, **over)


def submitted(rec: InboundRecord) -> SrsSubmitted:
    return SrsSubmitted.model_validate_json(rec.value)


@dataclass
class TopicReader:
    """The submitted topic from its beginning (`tools.recorder`), its records indexed by submission id."""

    bootstrap: str
    topic: str
    seen: dict[str, list[InboundRecord]] = field(default_factory=dict)
    others: list[InboundRecord] = field(default_factory=list)  # records without a submission id (transfers)
    recorder: TopicRecorder | None = None

    async def start(self) -> None:
        self.seen.clear()
        self.others.clear()
        self.recorder = await TopicRecorder(self.bootstrap, self.topic).start()

    async def stop(self) -> None:
        if self.recorder is not None:
            await self.recorder.stop()

    async def poll(self) -> None:
        assert self.recorder is not None
        indexed = len(self.others) + sum(len(v) for v in self.seen.values())
        for rec in (await self.recorder.poll())[indexed:]:
            sid = json.loads(rec.value).get("submission_id")
            if sid is None:
                self.others.append(rec)
            else:
                self.seen.setdefault(sid, []).append(rec)

    async def wait_for(self, submission_id: str, count: int = 1, timeout: float = 20) -> list[InboundRecord]:
        async def check() -> list[InboundRecord] | None:
            await self.poll()
            got = self.seen.get(submission_id, [])
            return got if len(got) >= count else None

        found = await eventually(check, timeout=timeout, interval=0.05)
        assert found is not None
        return found

    async def wait_for_other(self, match: Callable[[InboundRecord], bool], timeout: float = 20) -> InboundRecord:
        """The first record without a submission id that `match`es."""
        async def check() -> InboundRecord | None:
            await self.poll()
            return next((r for r in self.others if match(r)), None)

        found = await eventually(check, timeout=timeout, interval=0.05)
        assert found is not None
        return found


@dataclass
class Keys:
    submit: str
    read: str
    north: str  # bound to site "north"
    other_tenant: str
    admin: str = ""  # tenant-wide
    admin_north: str = ""  # an admin key bound to site "north"


@dataclass
class Intake:
    app: FastAPI
    http: httpx.AsyncClient
    keys: Keys
    reader: TopicReader
    ns: Namespace

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.keys.submit}"}

    async def post(self, body: Any, key: str | None = None, path: str = "/v1/submissions",
                   **kw: Any) -> httpx.Response:
        return await self.http.post(path, json=body, headers={**self.auth(key), **kw.pop("headers", {})}, **kw)


async def make_keys(ns: Namespace) -> Keys:
    client: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        db = client[ns.database]
        submit, _ = await auth.create_key(db, "acme", "submit")
        read, _ = await auth.create_key(db, "acme", "read")
        north, _ = await auth.create_key(db, "acme", "submit", "north")
        other, _ = await auth.create_key(db, "globex", "submit")
        admin, _ = await auth.create_key(db, "acme", "admin")
        admin_north, _ = await auth.create_key(db, "acme", "admin", "north")
    finally:
        await client.close()
    return Keys(submit, read, north, other, admin, admin_north)


async def ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


def intake_config(ns: Namespace, **settings: Any) -> IntakeConfig:
    base = {"rate_per_second": 1_000_000, "rate_burst": 1_000_000, "publish_timeout_seconds": 5.0}
    return IntakeConfig(kafka=ns.kafka(), mongo=ns.mongo(), intake=IntakeSettings(**{**base, **settings}))


@pytest.fixture(scope="module")
async def intake(namespace_m: Namespace) -> AsyncIterator[Intake]:
    app = create_app(intake_config(namespace_m))
    keys = await make_keys(namespace_m)
    reader = TopicReader(namespace_m.stack.bootstrap, namespace_m.kafka().topics().submitted)
    await reader.start()
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://intake", timeout=30) as http:
        await eventually(lambda: ready(http), timeout=60)
        yield Intake(app, http, keys, reader, namespace_m)
    await reader.stop()


# --- accepted submissions and their events ---------------------------------------------------


async def test_valid_submission_is_202_and_published_with_key_headers_and_ids(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="acc-1"), headers={"X-Correlation-ID": "corr-abc.1"})
    assert r.status_code == 202, r.text
    assert r.json() == {"submission_id": "acc-1", "status": "accepted"}
    assert r.headers["x-correlation-id"] == "corr-abc.1"
    [rec] = await intake.reader.wait_for("acc-1")
    assert rec.key == b"acme:p-8812"
    assert rec.headers["correlation_id"] == "corr-abc.1"
    assert rec.headers["content-type"] == "application/json"
    ev = submitted(rec)
    assert ev.event_id == ids.submitted_event_id("acme", "acc-1")
    assert ev.tenant_id == "acme"
    assert (ev.client_id, ev.clinician_id, ev.site_id, ev.session_number) == ("p-8812", "c-17", "north", 3)
    assert ev.items is not None and ev.items.values() == (9.1, 8.4, 9.0, 8.8)
    assert ev.total is None
    assert ev.accepted_at.tzinfo is not None and abs(ev.accepted_at - datetime.now(UTC)) < timedelta(minutes=5)


async def test_submission_without_id_gets_a_server_generated_one(intake: Intake) -> None:
    r = await intake.post(submission())
    assert r.status_code == 202, r.text
    sid = r.json()["submission_id"]
    assert len(sid) == 36
    [rec] = await intake.reader.wait_for(sid)
    assert submitted(rec).event_id == ids.submitted_event_id("acme", sid)


async def test_retry_with_the_same_submission_id_carries_the_same_event_id(intake: Intake) -> None:
    for _ in range(2):
        assert (await intake.post(submission(submission_id="retry-1"))).status_code == 202
    recs = await intake.reader.wait_for("retry-1", count=2)
    # At-least-once: a retry may be published again, but as the same event (downstream dedupes on it).
    assert {submitted(r).event_id for r in recs} == {ids.submitted_event_id("acme", "retry-1")}
    assert len({r.partition for r in recs}) == 1


async def test_total_only_submission_of_any_instrument_is_accepted(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="tot-1", items=..., total=36.5, instrument="YCSRS",
                                     episode_id="ep-2"))
    assert r.status_code == 202, r.text
    ev = submitted((await intake.reader.wait_for("tot-1"))[0])
    assert (ev.total, ev.items, ev.instrument, ev.episode_id) == (36.5, None, "YCSRS", "ep-2")


async def test_tenant_is_taken_from_the_key(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="ten-1"), key=intake.keys.other_tenant)
    assert r.status_code == 202
    [rec] = await intake.reader.wait_for("ten-1")
    assert submitted(rec).tenant_id == "globex" and rec.key == b"globex:p-8812"


async def test_tenant_id_in_the_body_is_rejected_as_unknown_field(intake: Intake) -> None:
    r = await intake.post(submission(tenant_id="globex"))
    assert r.status_code == 422
    assert r.json() == {"errors": [{"field": "tenant_id", "message": "Extra inputs are not permitted"}]}


async def test_invalid_correlation_header_is_replaced_by_a_generated_one(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="corr-2"), headers={"X-Correlation-ID": "bad id with spaces"})
    assert r.status_code == 202
    cid = r.headers["x-correlation-id"]
    assert cid != "bad id with spaces" and len(cid) == 36
    [rec] = await intake.reader.wait_for("corr-2")
    assert rec.headers["correlation_id"] == cid


# --- 422: every rule names its field -----------------------------------------------------------

ITEMS = {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8}
FUTURE = (datetime.now(UTC) + timedelta(days=2)).isoformat()

RULES: list[tuple[str, Callable[[], Any], str, str]] = [
    ("item above 10", lambda: submission(items={**ITEMS, "goals": 10.5}), "items.goals", "less than or equal to 10"),
    ("item below 0", lambda: submission(items={**ITEMS, "goals": -0.1}), "items.goals", "greater than or equal to 0"),
    ("item with two decimals", lambda: submission(items={**ITEMS, "goals": 8.45}), "items.goals", "one decimal"),
    ("item as text", lambda: submission(items={**ITEMS, "goals": "8.4"}), "items.goals", "valid number"),
    ("item as boolean", lambda: submission(items={**ITEMS, "goals": True}), "items.goals", "valid number"),
    ("items and total", lambda: submission(total=35.3), "total", "not both"),
    ("neither items nor total", lambda: submission(items=...), "items", "either items"),
    ("partial items", lambda: submission(items={"relationship": 9.0, "goals": 8.0, "approach": 9.0}),
     "items.overall", "partial items"),
    ("unknown item", lambda: submission(items={**ITEMS, "mood": 5.0}), "items.mood", "Extra inputs"),
    ("total above 40", lambda: submission(items=..., total=40.1), "total", "less than or equal to 40"),
    ("total with two decimals", lambda: submission(items=..., total=30.25), "total", "one decimal"),
    ("unknown instrument", lambda: submission(instrument="XRS"), "instrument", "'SRS'"),
    ("session number 0", lambda: submission(session_number=0), "session_number", "greater than or equal to 1"),
    ("session number not integer", lambda: submission(session_number=2.5), "session_number", "valid integer"),
    ("session number huge", lambda: submission(session_number=10**20), "session_number", "less than or equal"),
    ("timestamp without offset", lambda: submission(administered_at="2026-11-20T14:05:00"), "administered_at",
     "timezone"),
    ("timestamp over a day ahead", lambda: submission(administered_at=FUTURE), "administered_at", "future"),
    ("timestamp as number", lambda: submission(administered_at=1764000000), "administered_at", "ISO-8601"),
    ("timestamp not a date", lambda: submission(administered_at="yesterday"), "administered_at", "datetime"),
    ("submission id empty", lambda: submission(submission_id=""), "submission_id", "at least 1"),
    ("submission id too long", lambda: submission(submission_id="x" * 129), "submission_id", "at most 128"),
    ("submission id bad characters", lambda: submission(submission_id="a b/c"), "submission_id", "pattern"),
    ("client id empty", lambda: submission(client_id=""), "client_id", "at least 1"),
    ("client id missing", lambda: submission(client_id=...), "client_id", "Field required"),
    ("clinician id too long", lambda: submission(clinician_id="c" * 129), "clinician_id", "at most 128"),
    ("site id bad characters", lambda: submission(site_id="north site"), "site_id", "pattern"),
    ("episode id bad characters", lambda: submission(episode_id="ep#1"), "episode_id", "pattern"),
    ("unknown field", lambda: submission(rating_scale="v2"), "rating_scale", "Extra inputs"),
    ("not an object", lambda: [submission()], "body", "JSON object"),
]


@pytest.mark.parametrize(("case", "make", "field", "message"), RULES, ids=[r[0] for r in RULES])
async def test_rule_violation_is_422_naming_the_field_and_rule(intake: Intake, case: str, make: Callable[[], Any],
                                                               field: str, message: str) -> None:
    r = await intake.post(make())
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and message in e["message"] for e in errors), errors


async def test_every_violation_of_one_submission_is_reported(intake: Intake) -> None:
    r = await intake.post(submission(session_number=0, site_id="", items={**ITEMS, "goals": 11}))
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"session_number", "site_id", "items.goals"}


async def test_malformed_json_is_422(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions", content=b'{"client_id": ', headers={
        **intake.auth(), "Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "body"
    assert "invalid JSON" in r.json()["errors"][0]["message"]


# --- 401 / 403 -----------------------------------------------------------------------------------


async def test_missing_key_is_401(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions", json=submission())
    assert r.status_code == 401
    assert r.json()["errors"][0]["field"] == "Authorization"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_unknown_key_is_401(intake: Intake) -> None:
    r = await intake.post(submission(), key="ak_not-a-key")
    assert r.status_code == 401


async def test_key_without_submit_role_is_403(intake: Intake) -> None:
    r = await intake.post(submission(), key=intake.keys.read)
    assert r.status_code == 403
    assert "submit" in r.json()["errors"][0]["message"]


async def test_site_bound_key_submitting_for_another_site_is_403_naming_site_id(intake: Intake) -> None:
    r = await intake.post(submission(site_id="south"), key=intake.keys.north)
    assert r.status_code == 403
    assert r.json()["errors"][0]["field"] == "site_id"


async def test_site_bound_key_submitting_for_its_site_is_accepted(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="site-ok", site_id="north"), key=intake.keys.north)
    assert r.status_code == 202
    await intake.reader.wait_for("site-ok")


# --- 413 / 415 -----------------------------------------------------------------------------------


async def test_single_body_over_64_kib_is_413_by_content_length(intake: Intake) -> None:
    body = json.dumps(submission(client_id="p-1", padding="x" * 70_000)).encode()
    r = await intake.http.post("/v1/submissions", content=body, headers={
        **intake.auth(), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "65536" in r.json()["errors"][0]["message"]


async def test_single_body_over_64_kib_without_content_length_is_413(intake: Intake) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 4096  # JSON whitespace: only the size can be wrong

    r = await intake.http.post("/v1/submissions", content=chunks(), headers={
        **intake.auth(), "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


async def test_batch_body_over_4_mib_is_413(intake: Intake) -> None:
    body = json.dumps({"submissions": [submission(client_id="p" * 120)] * 1000,
                       "pad": "x" * (4 * 1024 * 1024)}).encode()
    r = await intake.http.post("/v1/submissions/batch", content=body, headers={
        **intake.auth(), "Content-Type": "application/json"})
    assert r.status_code == 413


async def test_batch_body_of_1_mib_is_not_too_large(intake: Intake) -> None:
    items = [submission(submission_id=f"big-{i}", clinician_id="c" * 100, episode_id="e" * 100) for i in range(1000)]
    body = json.dumps({"submissions": items}).encode()
    assert 65_536 < len(body) < 4 * 1024 * 1024
    r = await intake.http.post("/v1/submissions/batch", content=body, headers={
        **intake.auth(), "Content-Type": "application/json"})
    assert r.status_code == 200
    assert all(x["status"] == "accepted" for x in r.json()["results"])


async def test_body_that_is_not_json_is_415(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions", content=b"client_id=p-1", headers={
        **intake.auth(), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert r.json()["errors"][0]["field"] == "Content-Type"


async def test_body_without_content_type_is_415(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions", content=json.dumps(submission()).encode(), headers=intake.auth())
    assert r.status_code == 415


async def test_json_with_charset_parameter_is_accepted(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions", content=json.dumps(submission()).encode(), headers={
        **intake.auth(), "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 202


# --- batch -----------------------------------------------------------------------------------------


async def test_batch_accepts_valid_items_and_rejects_invalid_ones_by_index(intake: Intake) -> None:
    items = [submission(submission_id="b-0"), submission(submission_id="b-1", session_number=0),
             submission(submission_id="b-2", client_id="p-2"), "not an object"]
    r = await intake.post({"submissions": items}, path="/v1/submissions/batch")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["index"], x["submission_id"], x["status"]) for x in results] == [
        (0, "b-0", "accepted"), (1, "b-1", "rejected"), (2, "b-2", "accepted"), (3, None, "rejected")]
    assert results[1]["errors"] == [{"field": "session_number",
                                     "message": "Input should be greater than or equal to 1"}]
    assert results[3]["errors"][0]["field"] == "body"
    await intake.reader.wait_for("b-0")
    [rec] = await intake.reader.wait_for("b-2")
    assert rec.key == b"acme:p-2"
    await intake.reader.poll()
    assert "b-1" not in intake.reader.seen


@pytest.mark.parametrize("instrument", [{"ORS": 1}, ["ORS"]], ids=["an object", "a list"])
async def test_an_instrument_that_is_not_a_string_is_a_rejected_item_naming_the_field(
        intake: Intake, instrument: Any) -> None:
    # Found by the API contract test: an unhashable instrument was looked up in a set (500).
    r = await intake.post({"submissions": [submission(submission_id="bi-0", instrument=instrument)]},
                          path="/v1/submissions/batch")
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["status"] == "rejected" and [e["field"] for e in result["errors"]] == ["instrument"]


async def test_a_single_submission_with_an_instrument_that_is_not_a_string_is_422(intake: Intake) -> None:
    r = await intake.post(submission(submission_id="si-0", instrument={"ORS": 1}))
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["instrument"]


async def test_batch_items_share_the_request_correlation_id(intake: Intake) -> None:
    r = await intake.post({"submissions": [submission(submission_id=f"bc-{i}") for i in range(3)]},
                          path="/v1/submissions/batch", headers={"X-Correlation-ID": "batch-corr"})
    assert r.status_code == 200
    for i in range(3):
        assert (await intake.reader.wait_for(f"bc-{i}"))[0].headers["correlation_id"] == "batch-corr"


async def test_batch_of_1000_is_accepted_and_of_1001_is_422(intake: Intake) -> None:
    items = [submission(submission_id=f"k-{i}", client_id=f"p-{i}") for i in range(1001)]
    r = await intake.post({"submissions": items[:1000]}, path="/v1/submissions/batch")
    assert r.status_code == 200
    assert sum(x["status"] == "accepted" for x in r.json()["results"]) == 1000
    await intake.reader.wait_for("k-999")
    r = await intake.post({"submissions": items}, path="/v1/submissions/batch")
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "submissions", "message": "must hold 1 to 1000 submissions, got 1001"}]


@pytest.mark.parametrize(("body", "field"), [
    ({"submissions": []}, "submissions"),
    ({"submissions": "x"}, "submissions"),
    ({}, "submissions"),
    ({"submissions": [{}], "extra": 1}, "extra"),
    ([], "body"),
], ids=["empty", "not a list", "missing", "unknown field", "not an object"])
async def test_malformed_batch_envelope_is_422(intake: Intake, body: Any, field: str) -> None:
    r = await intake.post(body, path="/v1/submissions/batch")
    assert r.status_code == 422
    assert field in [e["field"] for e in r.json()["errors"]]


async def test_batch_with_site_bound_key_rejects_items_of_other_sites(intake: Intake) -> None:
    items = [submission(submission_id="bs-0", site_id="north"), submission(submission_id="bs-1", site_id="south")]
    r = await intake.post({"submissions": items}, path="/v1/submissions/batch", key=intake.keys.north)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["accepted", "rejected"]
    assert res[1]["errors"][0]["field"] == "site_id"


async def test_batch_with_read_key_is_403(intake: Intake) -> None:
    r = await intake.post({"submissions": [submission()]}, path="/v1/submissions/batch", key=intake.keys.read)
    assert r.status_code == 403


# --- CSV ---------------------------------------------------------------------------------------------

CSV_HEADER = ("submission_id,client_id,clinician_id,site_id,session_number,administered_at,"
              "relationship,goals,approach,overall,total")


CSV_WHEN = (datetime.now(UTC) - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)


def csv_row(sid: str, *, session: str = "2", items: str = "9.1,8.4,9.0,8.8", total: str = "",
            client: str = "p-77") -> str:
    return f"{sid},{client},c-17,north,{session},{CSV_WHEN.isoformat()},{items},{total}"


async def post_csv(intake: Intake, text: str, key: str | None = None) -> httpx.Response:
    return await intake.http.post("/v1/submissions/csv", content=text.encode(), headers={
        **intake.auth(key), "Content-Type": "text/csv"})


async def test_csv_import_reports_each_row_by_line_and_publishes_the_valid_ones(intake: Intake) -> None:
    text = "\n".join([CSV_HEADER, csv_row("csv-1"), csv_row("csv-2", session="zero"), "",
                      csv_row("", items=",,,", total="36.5"), csv_row("csv-4", items="9.1,,9.0,8.8")]) + "\n"
    r = await post_csv(intake, text)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [(x["row"], x["status"]) for x in res] == [(2, "accepted"), (3, "rejected"), (5, "accepted"),
                                                      (6, "rejected")]
    assert res[1]["errors"][0]["field"] == "session_number"
    assert res[3]["errors"][0]["field"] == "items.goals"
    derived = res[2]["submission_id"]
    assert derived == session_submission_id("acme", "p-77", "SRS", None, 2, CSV_WHEN)
    [rec] = await intake.reader.wait_for(derived)
    assert submitted(rec).total == 36.5 and submitted(rec).event_id == ids.submitted_event_id("acme", derived)
    await intake.reader.wait_for("csv-1")


async def test_a_csv_posted_twice_yields_the_same_submission_ids(intake: Intake) -> None:
    rows = [csv_row("", client="p-twice-1", session="1"), csv_row("", client="p-twice-1", session="2"),
            csv_row("", client="p-twice-2", session="1", items=",,,", total="30.0")]
    text = "\n".join([CSV_HEADER, *rows]) + "\n"
    first, again = (await post_csv(intake, text)).json()["results"], (await post_csv(intake, text)).json()["results"]
    assert all(x["status"] == "accepted" for x in first + again)
    ids_first = [x["submission_id"] for x in first]
    assert ids_first == [x["submission_id"] for x in again] and len(set(ids_first)) == 3
    # the same rows in another order, in a later export with a changed row: the same ids
    changed = rows[2].replace("30.0", "31.5")
    later = (await post_csv(intake, "\n".join([CSV_HEADER, csv_row("", client="p-twice-1", session="3"),
                                               changed, rows[1], rows[0]]) + "\n")).json()["results"]
    assert [x["submission_id"] for x in later[1:]] == [ids_first[2], ids_first[1], ids_first[0]]
    recs = await intake.reader.wait_for(ids_first[2], count=3)
    assert {submitted(r).event_id for r in recs} == {ids.submitted_event_id("acme", ids_first[2])}
    assert sorted(submitted(r).total or 0 for r in recs) == [30.0, 30.0, 31.5]
    # another tenant's identical file: other ids
    other = (await post_csv(intake, text, key=intake.keys.other_tenant)).json()["results"]
    assert not {x["submission_id"] for x in other} & set(ids_first)


async def test_csv_with_unknown_or_missing_columns_is_422(intake: Intake) -> None:
    r = await intake.http.post("/v1/submissions/csv", content=b"client_id,mood\np-1,5\n", headers={
        **intake.auth(), "Content-Type": "text/csv"})
    assert r.status_code == 422
    messages = " ".join(e["message"] for e in r.json()["errors"])
    assert "unknown columns: mood" in messages and "missing required columns" in messages


async def test_csv_endpoint_refuses_json_with_415(intake: Intake) -> None:
    r = await intake.post({"submissions": []}, path="/v1/submissions/csv")
    assert r.status_code == 415


# --- client transfers -------------------------------------------------------------------------------


async def transfer(intake: Intake, client: str, body: Any, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await intake.http.post(f"/v1/clients/{client}/transfer", json=body,
                                  headers={**headers, **kw.pop("headers", {})}, **kw)


async def test_a_tenant_wide_admin_key_transfers_a_client_through_the_submitted_topic(intake: Intake) -> None:
    r = await transfer(intake, "p-move-1", {"site_id": "south"}, intake.keys.admin,
                       headers={"X-Correlation-ID": "transfer-corr-1"})
    assert r.status_code == 202, r.text
    assert r.json() == {"client_id": "p-move-1", "site_id": "south", "status": "accepted"}
    rec = await intake.reader.wait_for_other(lambda p: p.headers.get("correlation_id") == "transfer-corr-1")
    assert rec.key == ids.partition_key("acme", "p-move-1") == b"acme:p-move-1"
    assert rec.headers[RECORD_TYPE_HEADER] == CLIENT_TRANSFER
    assert rec.headers["content-type"] == "application/json"
    ev = ClientTransfer.model_validate_json(rec.value)
    assert (ev.tenant_id, ev.client_id, ev.site_id, ev.record_type) == ("acme", "p-move-1", "south", CLIENT_TRANSFER)
    assert ev.requested_by == auth.hash_key(intake.keys.admin)[:16]
    assert ev.occurred_at == ev.accepted_at and abs(ev.accepted_at - datetime.now(UTC)) < timedelta(minutes=5)
    # the client's submissions and its transfers share a partition, so they are applied in order
    assert (await intake.post(submission(submission_id="move-sub-1", client_id="p-move-1"))).status_code == 202
    assert (await intake.reader.wait_for("move-sub-1"))[0].partition == rec.partition


async def test_a_transfer_is_answered_only_once_its_copies_on_both_submitted_topics_are_acknowledged(
        intake: Intake, ors_reader: TopicReader, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = intake.app.state.intake.publisher
    real, release = publisher._publish_outcome, asyncio.Event()

    async def held_ack(*args: Any, **kw: Any) -> Any:
        ack = await real(*args, **kw)  # sent; its acknowledgement handed over only once released

        async def later() -> Any:
            await release.wait()
            return await ack
        return later()

    monkeypatch.setattr(publisher, "_publish_outcome", held_ack)
    request = asyncio.create_task(transfer(intake, "p-move-both", {"site_id": "south"}, intake.keys.admin,
                                           headers={"X-Correlation-ID": "transfer-both"}))
    on_srs = await intake.reader.wait_for_other(lambda p: p.headers.get("correlation_id") == "transfer-both")
    await asyncio.sleep(0.5)
    assert not request.done()  # the srs.submitted.v1 copy is acknowledged, the ors.submitted.v1 one not yet
    release.set()
    assert (await request).status_code == 202
    on_ors = await ors_reader.wait_for_other(lambda p: p.headers.get("correlation_id") == "transfer-both")
    assert (on_ors.key, on_ors.value, on_ors.headers[RECORD_TYPE_HEADER]) == (on_srs.key, on_srs.value,
                                                                              CLIENT_TRANSFER)


async def test_a_transfer_whose_ors_topic_copy_is_not_acknowledged_is_not_accepted(
        intake: Intake, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(*args: Any, **kw: Any) -> Any:
        raise ConnectionError("the broker refused the write")

    monkeypatch.setattr(intake.app.state.intake.publisher, "_publish_outcome", refused)
    r = await transfer(intake, "p-move-half", {"site_id": "south"}, intake.keys.admin)
    assert r.status_code == 503 and "retry" in r.json()["errors"][0]["message"]
    assert r.headers["retry-after"]


async def test_every_transfer_request_is_an_event_of_its_own(intake: Intake) -> None:
    for cid in ("transfer-twice-a", "transfer-twice-b"):
        r = await transfer(intake, "p-move-2", {"site_id": "south"}, intake.keys.admin,
                           headers={"X-Correlation-ID": cid})
        assert r.status_code == 202
    a = await intake.reader.wait_for_other(lambda p: p.headers.get("correlation_id") == "transfer-twice-a")
    b = await intake.reader.wait_for_other(lambda p: p.headers.get("correlation_id") == "transfer-twice-b")
    assert json.loads(a.value)["event_id"] != json.loads(b.value)["event_id"]


async def test_the_operator_cli_publishes_the_same_transfer_records(intake: Intake, ors_reader: TopicReader) -> None:
    from services.intake.cli import publish_transfer

    event_id = await publish_transfer(intake.ns.kafka(), "acme", "p-move-cli", "south")
    rec = await intake.reader.wait_for_other(lambda p: json.loads(p.value)["event_id"] == event_id)
    copy = await ors_reader.wait_for_other(lambda p: json.loads(p.value)["event_id"] == event_id)
    assert (copy.key, copy.value, copy.headers[RECORD_TYPE_HEADER]) == (rec.key, rec.value, CLIENT_TRANSFER)
    assert rec.key == b"acme:p-move-cli" and rec.headers[RECORD_TYPE_HEADER] == CLIENT_TRANSFER
    ev = ClientTransfer.model_validate_json(rec.value)
    assert (ev.tenant_id, ev.client_id, ev.site_id, ev.requested_by) == ("acme", "p-move-cli", "south", "operator-cli")


async def test_a_site_bound_admin_key_may_not_transfer_clients(intake: Intake) -> None:
    r = await transfer(intake, "p-move-3", {"site_id": "north"}, intake.keys.admin_north)
    assert r.status_code == 403
    [error] = r.json()["errors"]
    assert error["field"] == "Authorization" and "tenant-wide admin key" in error["message"]
    assert "north" in error["message"]


@pytest.mark.parametrize("role", ["submit", "read", "north"])
async def test_a_key_without_the_admin_role_gets_403(intake: Intake, role: str) -> None:
    r = await transfer(intake, "p-move-4", {"site_id": "south"}, getattr(intake.keys, role))
    assert r.status_code == 403
    assert r.json()["errors"] == [{"field": "Authorization", "message": "this key's role does not allow 'admin'"}]


async def test_a_transfer_without_a_key_is_401(intake: Intake) -> None:
    r = await transfer(intake, "p-move-5", {"site_id": "south"}, None)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("client", "body", "field", "message"), [
    ("p-move-6", {"site_id": "south site"}, "site_id", "pattern"),
    ("p-move-6", {"site_id": ""}, "site_id", "at least 1"),
    ("p-move-6", {"site_id": "s" * 129}, "site_id", "at most 128"),
    ("p-move-6", {"site_id": 7}, "site_id", "valid string"),
    ("p-move-6", {}, "site_id", "Field required"),
    ("p-move-6", {"site_id": "south", "note": "x"}, "note", "Extra inputs"),
    ("p-move-6", ["south"], "body", "JSON object"),
    ("p%20move", {"site_id": "south"}, "client_id", "pattern"),
    ("p%2Fmove", {"site_id": "south"}, "client_id", "pattern"),
    ("p" * 129, {"site_id": "south"}, "client_id", "at most 128"),
], ids=["site with space", "site empty", "site too long", "site not a string", "site missing", "unknown field",
        "not an object", "client with space", "client with slash", "client too long"])
async def test_a_transfer_breaking_an_id_rule_is_422_naming_the_field(intake: Intake, client: str, body: Any,
                                                                       field: str, message: str) -> None:
    r = await transfer(intake, client, body, intake.keys.admin)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and message in e["message"] for e in errors), errors


async def test_a_transfer_body_that_is_not_json_is_415_or_422(intake: Intake) -> None:
    r = await intake.http.post("/v1/clients/p-move-7/transfer", content=b"site_id=south", headers={
        **intake.auth(intake.keys.admin), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = await intake.http.post("/v1/clients/p-move-7/transfer", content=b'{"site_id": ', headers={
        **intake.auth(intake.keys.admin), "Content-Type": "application/json"})
    assert r.status_code == 422 and "invalid JSON" in r.json()["errors"][0]["message"]


async def test_transfer_metrics_use_the_route_template(intake: Intake) -> None:
    assert (await transfer(intake, "p-move-8", {"site_id": "south"}, intake.keys.admin)).status_code == 202
    assert (await transfer(intake, "p-move-9", {"site_id": "south"}, intake.keys.submit)).status_code == 403
    text = (await intake.http.get("/metrics")).text
    transfers = 'alliance_http_requests_total{method="POST",route="/v1/clients/{client_id}/transfer",service="intake"'
    assert f'{transfers},status="202"}}' in text
    assert f'{transfers},status="403"}}' in text
    assert "p-move-8" not in text
    assert 'alliance_intake_client_transfers_total{outcome="accepted",reason="ok"}' in text
    assert 'alliance_intake_client_transfers_total{outcome="rejected",reason="forbidden"}' in text


# --- metrics and logs ---------------------------------------------------------------------------------


async def test_metrics_show_submissions_publish_latency_and_batch_size(intake: Intake) -> None:
    assert (await intake.post(submission())).status_code == 202
    assert (await intake.post(submission(session_number=0))).status_code == 422
    text = (await intake.http.get("/metrics")).text
    assert 'alliance_intake_submissions_total{outcome="accepted",reason="ok"}' in text
    assert 'alliance_intake_submissions_total{outcome="rejected",reason="invalid"}' in text
    assert 'alliance_intake_publish_seconds_bucket{endpoint="single"' in text
    assert 'alliance_intake_batch_size_bucket{endpoint="batch"' in text
    assert ('alliance_http_requests_total{method="POST",route="/v1/submissions",service="intake",status="202"}'
            in text)


async def test_logs_carry_submission_and_correlation_ids_but_no_client_id_or_rating(
        intake: Intake, caplog: pytest.LogCaptureFixture) -> None:
    # as shared.logs.configure does in every service: aiokafka logs payloads at DEBUG
    caplog.set_level(logging.WARNING, logger="aiokafka")
    caplog.set_level(logging.DEBUG)  # last: it also sets the capturing handler's level
    secret_client = "client-do-not-log-4711"
    r1 = await intake.post(submission(submission_id="log-1", client_id=secret_client,
                                      items={**ITEMS, "goals": 7.3}), headers={"X-Correlation-ID": "log-corr"})
    r2 = await intake.post({"submissions": [submission(submission_id="log-2", client_id=secret_client,
                                                       items={**ITEMS, "goals": 7.3})]},
                           path="/v1/submissions/batch")
    r3 = await intake.post(submission(client_id=secret_client, session_number=0))
    assert (r1.status_code, r2.status_code, r3.status_code) == (202, 200, 422)
    formatter = JsonFormatter("intake")
    lines = [formatter.format(rec) for rec in caplog.records]
    assert any('"submission_id": "log-1"' in line and '"correlation_id": "log-corr"' in line for line in lines)
    for line in lines:
        assert secret_client not in line and "7.3" not in line, line


# --- 429: a limit per key, counting submissions -----------------------------------------------------


@pytest.fixture(scope="module")
async def limited(namespace_m: Namespace) -> AsyncIterator[Intake]:
    """A second intake whose keys may submit 3 at once and then 1 per second."""
    app = create_app(intake_config(namespace_m, rate_per_second=1, rate_burst=3))
    keys = await make_keys(namespace_m)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://intake", timeout=30) as http:
        await eventually(lambda: ready(http), timeout=60)
        yield Intake(app, http, keys, TopicReader("", ""), namespace_m)


async def at_the_start_of_a_slot(window: float = 3.0) -> None:
    """Wait until a window's clock-aligned slot has just begun: a slot turning between the requests
    would let the sliding window's count drop below the burst, and the fourth request through."""
    await asyncio.sleep(window - time.time() % window + 0.01)


async def test_requests_past_the_per_key_rate_are_429_with_retry_after(limited: Intake) -> None:
    await at_the_start_of_a_slot()
    statuses = [(await limited.post(submission())).status_code for _ in range(3)]
    assert statuses == [202, 202, 202]
    r = await limited.post(submission())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "rate limit" in r.json()["errors"][0]["message"]
    # the bucket is per key: another key of the same tenant is not limited
    assert (await limited.post(submission(), key=limited.keys.north)).status_code == 202


async def test_batch_items_count_against_the_rate(limited: Intake) -> None:
    key = limited.keys.other_tenant
    await at_the_start_of_a_slot()
    r = await limited.post({"submissions": [submission(), submission(), submission()]}, key=key,
                           path="/v1/submissions/batch")
    assert r.status_code == 200
    r = await limited.post(submission(), key=key)
    assert r.status_code == 429
    # 3 per 3-second window (rate 1, burst 3): room again when this slot ends, within the window
    assert 1 <= int(r.headers["retry-after"]) <= 3


# --- the Outcome Rating Scale (docs/outcome.md): the same endpoints, its own topic --------------------

ORS_ITEMS = {"individually": 5.2, "interpersonally": 6.0, "socially": 5.8, "overall": 5.5}


def ors_submission(**over: Any) -> dict[str, Any]:
    """A valid ORS submission (given at the start of the session the SRS of `submission()` ends)."""
    return submission(**{"instrument": "ORS", "items": dict(ORS_ITEMS), "client_age": 34, **over})


@pytest.fixture(scope="module")
async def ors_reader(intake: Intake) -> AsyncIterator[TopicReader]:
    reader = TopicReader(intake.ns.stack.bootstrap, intake.ns.kafka().topics().ors_submitted)
    await reader.start()
    yield reader
    await reader.stop()


async def test_an_ors_is_202_and_published_to_the_ors_topic_with_key_headers_and_ids(
        intake: Intake, ors_reader: TopicReader) -> None:
    # (the traceparent header is added by the same send as an SRS record's, when tracing is on)
    r = await intake.post(ors_submission(submission_id="ors-1"), headers={"X-Correlation-ID": "corr-ors.1"})
    assert r.status_code == 202, r.text
    assert r.json() == {"submission_id": "ors-1", "status": "accepted"}
    [rec] = await ors_reader.wait_for("ors-1")
    assert rec.key == b"acme:p-8812"
    assert rec.headers["correlation_id"] == "corr-ors.1"
    assert rec.headers["content-type"] == "application/json"
    ev = OrsSubmitted.model_validate_json(rec.value)
    assert (ev.event_id, ev.tenant_id, ev.instrument, ev.client_age) == (
        ids.submitted_event_id("acme", "ors-1"), "acme", "ORS", 34)
    assert ev.items is not None and ev.items.values() == (5.2, 6.0, 5.8, 5.5) and ev.total is None


async def test_an_ors_is_not_published_to_the_srs_topic(intake: Intake, ors_reader: TopicReader) -> None:
    assert (await intake.post(submission(submission_id="pair-srs"))).status_code == 202
    assert (await intake.post(ors_submission(submission_id="pair-ors"))).status_code == 202
    await intake.reader.wait_for("pair-srs")
    await ors_reader.wait_for("pair-ors")
    assert "pair-ors" not in intake.reader.seen and "pair-srs" not in ors_reader.seen


@pytest.mark.parametrize("instrument", ["CORS", "YCORS"])
async def test_a_total_only_outcome_rating_of_the_child_forms_is_accepted(
        intake: Intake, ors_reader: TopicReader, instrument: str) -> None:
    sid = f"ors-tot-{instrument}"
    body = ors_submission(submission_id=sid, instrument=instrument, items=..., total=18.5, client_age=...)
    assert (await intake.post(body)).status_code == 202
    ev = OrsSubmitted.model_validate_json((await ors_reader.wait_for(sid))[0].value)
    assert (ev.instrument, ev.total, ev.items, ev.client_age) == (instrument, 18.5, None, None)


ORS_RULES: list[tuple[str, Callable[[], Any], str, str]] = [
    ("srs item on an ors", lambda: ors_submission(items={**ORS_ITEMS, "relationship": 9.0}), "items.relationship",
     "is an SRS item"),
    ("ors item on an srs", lambda: submission(items={**ITEMS, "socially": 5.0}), "items.socially", "is an ORS item"),
    ("ors item above 10", lambda: ors_submission(items={**ORS_ITEMS, "socially": 10.5}), "items.socially",
     "less than or equal to 10"),
    ("ors item with two decimals", lambda: ors_submission(items={**ORS_ITEMS, "overall": 5.55}), "items.overall",
     "one decimal"),
    ("partial ors items", lambda: ors_submission(items={"individually": 5.0, "interpersonally": 5.0, "overall": 5.0}),
     "items.socially", "partial items: all four of individually"),
    ("ors items and total", lambda: ors_submission(total=22.0), "total", "not both"),
    ("ors total above 40", lambda: ors_submission(items=..., total=40.5), "total", "less than or equal to 40"),
    ("client age above 130", lambda: ors_submission(client_age=131), "client_age", "less than or equal to 130"),
    ("client age negative", lambda: ors_submission(client_age=-1), "client_age", "greater than or equal to 0"),
    ("client age not whole", lambda: ors_submission(client_age=15.5), "client_age", "valid integer"),
    ("client age on an srs", lambda: submission(client_age=34), "client_age", "outcome rating only"),
    ("ors session number 0", lambda: ors_submission(session_number=0), "session_number", "greater than or equal"),
    ("ors timestamp over a day ahead", lambda: ors_submission(administered_at=FUTURE), "administered_at", "future"),
    ("ors unknown field", lambda: ors_submission(tenant_id="globex"), "tenant_id", "Extra inputs"),
    ("unknown instrument", lambda: submission(instrument="OQ45"), "instrument", "'ORS', 'CORS', 'YCORS'"),
]


@pytest.mark.parametrize(("case", "make", "field", "message"), ORS_RULES, ids=[r[0] for r in ORS_RULES])
async def test_an_outcome_rule_violation_is_422_naming_the_field_and_rule(
        intake: Intake, case: str, make: Callable[[], Any], field: str, message: str) -> None:
    r = await intake.post(make())
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and message in e["message"] for e in errors), errors


async def test_a_site_bound_key_submitting_an_ors_for_another_site_is_403_naming_site_id(intake: Intake) -> None:
    r = await intake.post(ors_submission(site_id="south"), key=intake.keys.north)
    assert r.status_code == 403
    assert r.json()["errors"][0]["field"] == "site_id"


async def test_a_single_ors_body_over_64_kib_is_413(intake: Intake) -> None:
    r = await intake.post(ors_submission(client_id="p-" + "x" * 70_000))
    assert r.status_code == 413


async def test_a_batch_may_mix_srs_and_ors_and_each_goes_to_its_topic(
        intake: Intake, ors_reader: TopicReader) -> None:
    r = await intake.post({"submissions": [
        submission(submission_id="mix-srs"), ors_submission(submission_id="mix-ors"),
        ors_submission(submission_id="mix-bad", items={**ORS_ITEMS, "goals": 8.0}),
        ors_submission(submission_id="mix-site", site_id="south"),
    ]}, key=intake.keys.north, path="/v1/submissions/batch", headers={"X-Correlation-ID": "corr-mix"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["accepted", "accepted", "rejected", "rejected"]
    assert res[2]["errors"][0]["field"] == "items.goals" and res[3]["errors"][0]["field"] == "site_id"
    [srs_rec] = await intake.reader.wait_for("mix-srs")
    [ors_rec] = await ors_reader.wait_for("mix-ors")
    assert srs_rec.headers["correlation_id"] == ors_rec.headers["correlation_id"] == "corr-mix"


ORS_CSV_HEADER = ("submission_id,instrument,client_id,clinician_id,site_id,session_number,administered_at,"
                  "client_age,individually,interpersonally,socially,relationship,goals,approach,overall,total")


def mixed_csv_row(sid: str, instrument: str, *, client: str = "p-78", session: str = "2", age: str = "",
                  ors_items: str = ",,", srs_items: str = ",,", overall: str = "", total: str = "") -> str:
    return (f"{sid},{instrument},{client},c-17,north,{session},{CSV_WHEN.isoformat()},{age},{ors_items},"
            f"{srs_items},{overall},{total}")


async def test_a_csv_mixing_srs_and_ors_rows_publishes_each_row_to_its_topic_with_derived_ids(
        intake: Intake, ors_reader: TopicReader) -> None:
    rows = [mixed_csv_row("", "ORS", age="15", ors_items="5.2,6.0,5.8", overall="5.5"),
            mixed_csv_row("", "SRS", srs_items="9.1,8.4,9.0", overall="8.8"),
            mixed_csv_row("", "CORS", client="p-79", session="1", total="20.0"),
            mixed_csv_row("", "ORS", client="p-80", ors_items="5.2,6.0,5.8", srs_items="9.1,,", overall="5.5"),
            mixed_csv_row("", "SRS", client="p-81", srs_items="9.1,8.4,9.0", overall="8.8", age="40")]
    text = "\n".join([ORS_CSV_HEADER, *rows]) + "\n"
    first = (await post_csv(intake, text)).json()["results"]
    assert [(x["row"], x["status"]) for x in first] == [(2, "accepted"), (3, "accepted"), (4, "accepted"),
                                                        (5, "rejected"), (6, "rejected")]
    assert [e["field"] for e in first[3]["errors"]] == ["items.relationship"]
    assert [e["field"] for e in first[4]["errors"]] == ["client_age"]
    ors_id, srs_id, cors_id = (x["submission_id"] for x in first[:3])
    assert ors_id == session_submission_id("acme", "p-78", "ORS", None, 2, CSV_WHEN) != srs_id
    assert srs_id == session_submission_id("acme", "p-78", "SRS", None, 2, CSV_WHEN)
    assert cors_id == session_submission_id("acme", "p-79", "CORS", None, 1, CSV_WHEN)
    # re-importing the same export changes nothing: the same ids, so the same events
    again = (await post_csv(intake, text)).json()["results"]
    assert [x["submission_id"] for x in again[:3]] == [ors_id, srs_id, cors_id]
    recs = await ors_reader.wait_for(ors_id, count=2)
    assert {OrsSubmitted.model_validate_json(r.value).event_id for r in recs} == {
        ids.submitted_event_id("acme", ors_id)}
    assert OrsSubmitted.model_validate_json(recs[0].value).client_age == 15
    assert OrsSubmitted.model_validate_json((await ors_reader.wait_for(cors_id))[0].value).total == 20.0
    await intake.reader.wait_for(srs_id, count=2)
    assert ors_id not in intake.reader.seen


async def test_ors_submissions_count_against_the_rate_like_srs_ones(limited: Intake) -> None:
    client: AsyncMongoClient[Document] = AsyncMongoClient(limited.ns.stack.mongo_url, tz_aware=True)
    try:
        key, _ = await auth.create_key(client[limited.ns.database], "acme", "submit")  # a bucket of its own
    finally:
        await client.close()
    await at_the_start_of_a_slot()
    r = await limited.post({"submissions": [ors_submission(), submission(), ors_submission()]}, key=key,
                           path="/v1/submissions/batch")
    assert r.status_code == 200
    r = await limited.post(ors_submission(), key=key)
    assert r.status_code == 429
    assert "rate limit" in r.json()["errors"][0]["message"]
