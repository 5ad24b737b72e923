"""The read API (role `read`; the submission status also `submit`) and the dashboard.

Isolation: every query is filtered by the key's tenant, and by its site when the key is bound
to one (a client's owning site; a submission's versions of that site, `rules.seen_by_site`). A
client (or submission) that does not exist and one of another tenant (or another site, for a
site-bound key) get the same 404 body, so nothing tells them apart. Summaries of a site other
than a site-bound key's own are 403 (the site is named in the request, the key says which it
may see); a site or clinician with nothing visible is 404.

Caching: JSON answers carry a strong ETag (hash of the body) and `Cache-Control: private`
with a short max-age; `If-None-Match` answers 304. `X-Reporting-Generation` names the read-model
generation that answered (it changes when a rebuild switches over).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from services.reporting import rules
from services.reporting.fhir import FHIR_JSON, trajectory_bundle
from services.reporting.models import (
    CaseloadOut,
    SitesOut,
    SubmissionOut,
    SubmissionsPageOut,
    SummaryOut,
    TrajectoryOut,
    TrendsOut,
)
from services.reporting.settings import ReportingSettings
from services.reporting.store import Generations, ReportingStore, SubmissionStore
from shared.audit import Auditor, note
from shared.auth import KeyStore, Principal, forbid_site, require
from shared.events import OUTCOME_OF, Instrument
from shared.http import error_body
from shared.mongo import TtlCache

log = logging.getLogger("alliance.reporting.api")

# Only documents the scheme in OpenAPI; `shared.auth.require` does the checking (uniform errors).
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="a read (or admin) API key")
STATIC = Path(__file__).resolve().parent / "static"
NOT_FOUND_CLIENT = error_body([("client_id", "no trajectory for this client and instrument")])
NOT_FOUND_EPISODE = error_body([("episode_id", "no such episode for this client and instrument")])
NOT_FOUND_SUBMISSION = error_body([("submission_id", "no submission with this id is known (yet)")])

# The dashboard loads only its own files; nothing may reach another origin.
DASHBOARD_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                 "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


AUTH: dict[int | str, dict[str, Any]] = {401: {"description": "missing or unknown API key"},
                                         403: {"description": "the key's role does not allow read"}}
InstrumentQ = Annotated[Instrument, Query(description="SRS, CSRS, GSRS, CGSRS or YCSRS")]
EpisodeQ = Annotated[str | None, Query(max_length=128, description="an episode; default: the current one")]
OldEpisodeQ = Annotated[str | None, Query(max_length=128, deprecated=True, description="former name of episode_id")]
SinceQ = Annotated[datetime | None, Query(description="only rejections at or after this time (ISO 8601)")]
CursorQ = Annotated[str | None, Query(max_length=2048, description="next_cursor of the previous page")]
LimitQ = Annotated[int | None, Query(ge=1, le=1000, description="page size (capped by the server)")]
MONTH = r"^\d{4}-(0[1-9]|1[0-2])$"
FromQ = Annotated[str, Query(alias="from", pattern=MONTH, description="first month, YYYY-MM (UTC)")]
ToQ = Annotated[str, Query(alias="to", pattern=MONTH, description="last month, YYYY-MM (UTC), at most "
                                                                  "120 months after `from`")]
MAX_TREND_MONTHS = 120


def _json_response(request: Request, body: Any, *, max_age: int, generation: str,
                   media_type: str = "application/json") -> Response:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    tag = rules.etag(raw)
    headers = {"ETag": tag, "Cache-Control": f"private, max-age={max_age}", "Vary": "Authorization",
               "X-Reporting-Generation": generation}
    if rules.etag_matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return Response(raw, media_type=media_type, headers=headers)


SummaryKey = tuple[str, str, str | None, str | None]  # (generation, tenant, site, clinician)
Compute = Callable[[], Awaitable[dict[str, Any] | None]]


class SummaryCache:
    """Summaries per (generation, tenant, site): each reads a scope's counters and counts its
    alerts, so it is computed at most once per `ttl` and scope (one computation at a time per
    scope, however many requests wait for it). An expired entry is served stale while one
    background task refreshes it, so only the very first request of a scope waits."""

    def __init__(self, ttl: float) -> None:
        self._items: TtlCache[SummaryKey, dict[str, Any] | None] = TtlCache(ttl)
        self._running: dict[SummaryKey, asyncio.Task[dict[str, Any] | None]] = {}

    def _refresh(self, key: SummaryKey, compute: Compute) -> asyncio.Task[dict[str, Any] | None]:
        task = self._running.get(key)
        if task is None:
            async def run() -> dict[str, Any] | None:
                try:
                    value = await compute()
                    self._items.put(key, value)
                    return value
                finally:
                    self._running.pop(key, None)

            task = asyncio.create_task(run(), name="reporting-summary")
            self._running[key] = task
        return task

    async def get(self, key: SummaryKey, compute: Compute) -> dict[str, Any] | None:
        """The summary of a scope: fresh from cache, stale while refreshing, or computed now."""
        if self._items.ttl <= 0:
            return await compute()
        hit = self._items.get(key)
        if hit is not None:
            if hit.stale:
                self._refresh(key, compute)
            return hit.value
        return await asyncio.shield(self._refresh(key, compute))


def read_or_submit(keys: Callable[[], KeyStore]) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency accepting a key whose role grants `read` or `submit` (401 without a valid key)."""
    reader, submitter = require(keys, "read"), require(keys, "submit")

    async def dependency(request: Request) -> Principal:
        try:
            return await reader(request)
        except HTTPException as exc:
            if exc.status_code != 403:
                raise
        return await submitter(request)

    return dependency


def build_router(store: ReportingStore, generations: Generations, keys: Callable[[], KeyStore],
                 settings: ReportingSettings, submissions: SubmissionStore, auditor: Auditor) -> APIRouter:
    """The `/v1` read endpoints. Reads of client-level data (trajectory, FHIR, caseload, submissions)
    append an audit entry each (`shared.audit`); the aggregate summaries do not."""
    router = APIRouter(prefix="/v1", tags=["reporting"], dependencies=[Security(BEARER)])
    reader = require(keys, "read")
    either = read_or_submit(keys)
    summaries = SummaryCache(settings.summary_cache_seconds)

    async def not_found(request: Request, p: Principal, client_id: str, instrument: Instrument, gen: str) -> NoReturn:
        """The 404 of a record this key does not see (read already, scoped to the key's site)."""
        # The caller gets the same 404 either way; the audit tells a foreign site's client apart.
        if p.site_id is not None and await store.record(gen, p.tenant_id, client_id, instrument.value, None):
            note(request, outcome="denied")
        raise HTTPException(404, NOT_FOUND_CLIENT)

    async def find_record(request: Request, p: Principal, client_id: str, instrument: Instrument,
                          gen: str | None = None) -> tuple[str, dict[str, Any]]:
        gen = gen or (await generations.current()).active
        doc = await store.record(gen, p.tenant_id, client_id, instrument.value, p.site_id)
        if doc is None:
            await not_found(request, p, client_id, instrument, gen)
        return gen, doc

    async def outcome_record(gen: str, p: Principal, client_id: str, instrument: Instrument) -> dict[str, Any] | None:
        """The client's record on the outcome instrument paired with `instrument` (the same site
        scope: one owning site across all instruments), None when there is none."""
        return await store.record(gen, p.tenant_id, client_id, OUTCOME_OF[instrument].value, p.site_id)

    async def find_episode(request: Request, p: Principal, client_id: str, instrument: Instrument,
                           episode_id: str | None, episode: str | None,
                           gen: str | None = None) -> tuple[str, dict[str, Any], str | None]:
        """The record (`find_record`) and the episode asked for (`episode_id`, else the older
        `episode` parameter; None: the whole record); 404 when the record has no such episode."""
        gen, doc = await find_record(request, p, client_id, instrument, gen)
        return gen, doc, pick_episode(doc, episode_id, episode)

    def pick_episode(doc: dict[str, Any], episode_id: str | None, episode: str | None) -> str | None:
        """The episode asked for (`episode_id`, else the older `episode` parameter; None: the
        current one); 404 when the record has no such episode."""
        chosen = episode_id if episode_id is not None else episode
        if chosen is not None and chosen not in {e["episode_id"] for e in doc.get("episodes", [])}:
            raise HTTPException(404, NOT_FOUND_EPISODE)
        return chosen

    @router.get("/clients/{client_id}/trajectory", summary="One client's trajectory on one instrument",
                responses={200: {"model": TrajectoryOut}, 304: {"description": "unchanged (If-None-Match)"},
                           404: {"description": "unknown client or episode (or not visible to this key)"},
                           **AUTH})
    async def trajectory(request: Request, client_id: str, p: Principal = auditor.route("trajectory.read", reader),
                         instrument: InstrumentQ = Instrument.SRS, episode_id: EpisodeQ = None,
                         episode: OldEpisodeQ = None) -> Response:
        gen = (await generations.current()).active
        rid = rules.record_id(p.tenant_id, client_id, instrument.value)
        # The record, its paired outcome record and the record's alerts are read together (the
        # record id is known from the request): one wait for the store, not three (issue 11).
        # Nothing of them is shown when neither record is (404).
        found, outcome, by_record = await asyncio.gather(
            store.record(gen, p.tenant_id, client_id, instrument.value, p.site_id),
            outcome_record(gen, p, client_id, instrument),
            store.alerts_for(gen, p.tenant_id, [rid]))
        if found is None and outcome is not None:
            # No session on this alliance instrument: a client with outcome sessions only still
            # has a trajectory (its outcome series; docs/partners.md).
            return await outcome_only(request, p, gen, outcome, instrument, pick_episode(outcome, episode_id, episode))
        if found is None:  # read above with the key's site: not read again for the 404 (issue 11)
            await not_found(request, p, client_id, instrument, gen)
        doc, chosen = found, pick_episode(found, episode_id, episode)
        outcome_alerts = (await store.alerts_for(gen, p.tenant_id, [outcome["_id"]], outcome=True)
                          if outcome else {})
        view = rules.trajectory_view(doc, by_record[rid], chosen, outcome,
                                     outcome_alerts.get(outcome["_id"], []) if outcome else [])
        return _json_response(request, view, max_age=settings.trajectory_max_age_seconds, generation=gen)

    async def outcome_only(request: Request, p: Principal, gen: str, outcome: dict[str, Any], instrument: Instrument,
                           chosen: str | None) -> Response:
        """The trajectory of a client whose only record is on the outcome instrument paired with `instrument`."""
        outcome_alerts = await store.alerts_for(gen, p.tenant_id, [outcome["_id"]], outcome=True)
        view = rules.outcome_only_view(instrument.value, outcome, outcome_alerts.get(outcome["_id"], []), chosen)
        return _json_response(request, view, max_age=settings.trajectory_max_age_seconds, generation=gen)

    @router.get("/clients/{client_id}/fhir", summary="The trajectory as a FHIR R4 Bundle",
                responses={200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}},
                                 "description": "a FHIR R4 Bundle (type collection)"},
                           304: {"description": "unchanged (If-None-Match)"},
                           404: {"description": "unknown client (or not visible to this key)"}, **AUTH})
    async def fhir(request: Request, client_id: str, p: Principal = auditor.route("fhir.read", reader),
                   instrument: InstrumentQ = Instrument.SRS, episode_id: EpisodeQ = None,
                   episode: OldEpisodeQ = None) -> Response:
        gen = (await generations.current()).active
        found, outcome = await asyncio.gather(
            store.record(gen, p.tenant_id, client_id, instrument.value, p.site_id),
            outcome_record(gen, p, client_id, instrument))
        if found is None and outcome is not None:
            # Outcome sessions only (as for the trajectory): the Bundle of the outcome record's
            # episode, its sessions built as in a Bundle with both scales.
            doc, chosen = outcome, pick_episode(outcome, episode_id, episode)
            outcome = None
        else:
            gen, doc, chosen = await find_episode(request, p, client_id, instrument, episode_id, episode, gen)
        return _json_response(request, trajectory_bundle(doc, chosen, outcome),
                              max_age=settings.trajectory_max_age_seconds, generation=gen, media_type=FHIR_JSON)

    @router.get("/clinicians/{clinician_id}/caseload", summary="A clinician's caseload, at-risk clients first",
                responses={200: {"model": CaseloadOut}, 304: {"description": "unchanged (If-None-Match)"},
                           404: {"description": "no trajectory of this clinician is visible to this key"},
                           422: {"description": "a cursor this API did not issue"}, **AUTH})
    async def caseload(request: Request, clinician_id: str,
                       p: Principal = auditor.route("caseload.read", reader, client_param=None,
                                                    target_param="clinician_id"),
                       cursor: CursorQ = None, limit: LimitQ = None) -> Response:
        size = min(limit or settings.page_size, settings.max_page_size)
        try:
            after = rules.decode_cursor(cursor) if cursor else None
        except rules.BadCursor as exc:
            raise HTTPException(422, error_body([("cursor", str(exc))])) from exc
        gen = (await generations.current()).active
        docs = await store.caseload(gen, p.tenant_id, clinician_id, p.site_id, after, size)
        if not docs and after is None:
            raise HTTPException(404, error_body([("clinician_id", "no caseload for this clinician")]))
        page, more = docs[:size], len(docs) > size
        # outcome records stand for clients with no alliance record (store.caseload)
        alone = {d["_id"] for d in page if rules.is_outcome(d["instrument"])}
        alerts, outcome_alerts = await asyncio.gather(
            store.alerts_for(gen, p.tenant_id, [d["_id"] for d in page if d["_id"] not in alone]),
            store.alerts_for(gen, p.tenant_id, sorted(alone), outcome=True))
        body = {
            "clinician_id": clinician_id,
            "clients": [rules.caseload_outcome_entry(d, outcome_alerts.get(d["_id"], [])) if d["_id"] in alone
                        else rules.caseload_entry(d, alerts.get(d["_id"], [])) for d in page],
            "next_cursor": rules.encode_cursor(page[-1]["caseload_key"]) if more else None,
        }
        return _json_response(request, body, max_age=settings.trajectory_max_age_seconds, generation=gen)

    async def summary_of(request: Request, p: Principal, site_id: str | None,
                         clinician_id: str | None = None) -> Response:
        gen = (await generations.current()).active
        key = (gen, p.tenant_id, site_id, clinician_id)
        body = await summaries.get(key, lambda: store.summary(gen, p.tenant_id, site_id, clinician_id))
        if body is None:
            if clinician_id is not None:
                raise HTTPException(404, error_body([("clinician_id", "no data for this clinician")]))
            if site_id is not None:
                raise HTTPException(404, error_body([("site_id", "no data for this site")]))
            # a tenant with no data yet: zeros
            body = {**rules.summarize([], 0, 0, {}, {}, 0, 0), "as_of": datetime.now(UTC).isoformat()}
        body = {"tenant_id": p.tenant_id, "site_id": site_id, **body}
        if clinician_id is not None:
            body["clinician_id"] = clinician_id
        return _json_response(request, body, max_age=settings.summary_max_age_seconds, generation=gen)

    @router.get("/sites/{site_id}/summary", summary="PCOMS indices of one site",
                responses={200: {"model": SummaryOut}, 403: {"description": "site-bound key of another site"},
                           404: {"description": "no data for this site"}, **AUTH})
    async def site_summary(request: Request, site_id: str, p: Principal = Depends(reader)) -> Response:
        if not p.may_see_site(site_id):
            raise forbid_site(site_id)
        return await summary_of(request, p, site_id)

    @router.get("/summary", summary="PCOMS indices of the whole tenant",
                responses={200: {"model": SummaryOut},
                           403: {"description": "a site-bound key sees only its site's summary"}, **AUTH})
    async def tenant_summary(request: Request, p: Principal = Depends(reader)) -> Response:
        if p.site_id is not None:
            raise HTTPException(403, error_body([("site_id", "this key is bound to one site; use "
                                                             f"/v1/sites/{p.site_id}/summary")]))
        return await summary_of(request, p, None)

    @router.get("/clinicians/{clinician_id}/summary", summary="PCOMS and outcome indices of one clinician's records",
                responses={200: {"model": SummaryOut}, 404: {"description": "no data of this clinician is visible "
                                                                          "to this key"}, **AUTH})
    async def clinician_summary(request: Request, clinician_id: str, p: Principal = Depends(reader)) -> Response:
        # a site-bound key sees the clinician's records at its site only (as for trends)
        return await summary_of(request, p, p.site_id, clinician_id)

    async def trends_of(request: Request, p: Principal, first: str, last: str, *, site_id: str | None = None,
                        clinician_id: str | None = None) -> Response:
        months = rules.months_between(first, last)
        if not months or len(months) > MAX_TREND_MONTHS:
            raise HTTPException(422, error_body([("to", f"must be from `from` to {MAX_TREND_MONTHS} months after it")]))
        gen = (await generations.current()).active
        series, as_of = await store.trends_as_of(gen, p.tenant_id, first, last, site_id=site_id,
                                                 clinician_id=clinician_id)
        body = {"tenant_id": p.tenant_id, "site_id": site_id, "clinician_id": clinician_id, "from_month": first,
                "to_month": last, "as_of": as_of.isoformat(), "months": series}
        return _json_response(request, body, max_age=settings.summary_max_age_seconds, generation=gen)

    trend_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": TrendsOut}, 422: {"description": "a month that is not YYYY-MM, or `to` before `from` or "
                                                        f"more than {MAX_TREND_MONTHS} months after it"}, **AUTH}

    @router.get("/summary/trends", summary="Monthly series of the whole tenant", responses={
        **trend_responses, 403: {"description": "a site-bound key sees only its site's trends"}})
    async def tenant_trends(request: Request, first: FromQ, last: ToQ, p: Principal = Depends(reader)) -> Response:
        if p.site_id is not None:
            raise HTTPException(403, error_body([("site_id", "this key is bound to one site; use "
                                                             f"/v1/sites/{p.site_id}/trends")]))
        return await trends_of(request, p, first, last)

    @router.get("/sites/{site_id}/trends", summary="Monthly series of one site", responses={
        **trend_responses, 403: {"description": "site-bound key of another site"}})
    async def site_trends(request: Request, site_id: str, first: FromQ, last: ToQ,
                          p: Principal = Depends(reader)) -> Response:
        if not p.may_see_site(site_id):
            raise forbid_site(site_id)
        return await trends_of(request, p, first, last, site_id=site_id)

    @router.get("/clinicians/{clinician_id}/trends", summary="Monthly series of one clinician's records",
                responses=trend_responses)
    async def clinician_trends(request: Request, clinician_id: str, first: FromQ, last: ToQ,
                               p: Principal = Depends(reader)) -> Response:
        # a site-bound key sees the clinician's records at its site only
        return await trends_of(request, p, first, last, site_id=p.site_id, clinician_id=clinician_id)

    @router.get("/sites", summary="The sites this key may read summaries and trends of",
                responses={200: {"model": SitesOut}, **AUTH})
    async def sites(request: Request, p: Principal = Depends(reader)) -> Response:
        gen = (await generations.current()).active
        listed = [p.site_id] if p.site_id is not None else await store.sites(gen, p.tenant_id)
        body = {"tenant_id": p.tenant_id, "bound_to": p.site_id, "sites": listed}
        return _json_response(request, body, max_age=settings.summary_max_age_seconds, generation=gen)

    either_auth: dict[int | str, dict[str, Any]] = {
        **AUTH, 403: {"description": "the key's role allows neither read nor submit"}}

    @router.get("/submissions/{submission_id}", summary="What happened to one submission",
                responses={200: {"model": SubmissionOut},
                           404: {"description": "unknown (yet), or not visible to this key"}, **either_auth})
    async def submission(request: Request, submission_id: str,
                         p: Principal = auditor.route("submission.read", either, client_param=None,
                                                      target_param="submission_id"),
                         scale: Annotated[Literal["alliance", "outcome"] | None, Query(
                             description="which submission of the id: `alliance` (the SRS-family one) or `outcome` "
                                         "(the ORS-family one); a submission id names one submission per scale. "
                                         "Default: the alliance one when there is one, else the outcome one")] = None,
                         ) -> JSONResponse:
        doc = await submissions.get(p.tenant_id, submission_id, scale)
        known = rules.submission_view(doc) if doc is not None else None
        body = rules.submission_view(doc, p.site_id) if doc is not None else None
        if known is not None and known.get("client_id"):
            note(request, client_id=(body or known)["client_id"])
        if body is None:
            if known is not None:
                note(request, outcome="denied")
            raise HTTPException(404, NOT_FOUND_SUBMISSION)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.get("/submissions", summary="A tenant's rejected submissions, oldest rejection first",
                responses={200: {"model": SubmissionsPageOut},
                           422: {"description": "a cursor this API did not issue"}, **either_auth})
    async def rejected_submissions(p: Principal = auditor.route("submissions.list", either, client_param=None),
                                   status: Annotated[Literal["rejected"], Query(
                                       description="only `rejected` is listed")] = "rejected",
                                   since: SinceQ = None, cursor: CursorQ = None,
                                   limit: LimitQ = None) -> JSONResponse:
        size = min(limit or settings.page_size, settings.max_page_size)
        floor = rules.rejection_sort_floor(since) if since is not None else ""
        try:
            after = max(rules.decode_cursor(cursor), floor) if cursor else floor
        except rules.BadCursor as exc:
            raise HTTPException(422, error_body([("cursor", str(exc))])) from exc
        docs = await submissions.rejections(p.tenant_id, p.site_id, after, size)
        page, more = docs[:size], len(docs) > size
        items = []
        for d in page:
            view = rules.submission_view(d, p.site_id)
            if view is not None:
                items.append(view)
        body = {"submissions": items,
                "next_cursor": rules.encode_cursor(page[-1]["rejected"]["sort"]) if more else None}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router


def mount_dashboard(app: FastAPI) -> None:
    """`GET /dashboard` and its static files (no external resources)."""
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.get("/dashboard", tags=["dashboard"], summary="The caseload, trajectory and network pages (sign in with "
                                                        "a read key)",
             response_class=FileResponse)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html",
                            headers={"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
