"""HTTP API of the alerts service (tenant-scoped; `admin` writes, `read` lists and acknowledges).

HTTP only: the commands (put a clinician, acknowledge, retry a delivery, create or delete a
subscription, rotate the webhook secret, set the escalation interval) and their rules live in
`services/alerts/service.py`, the typed rows (`Alert`, `Delivery`, ...) in `services/alerts/store.py`;
this module parses, checks the key's role, audits, reads, and maps the commands' errors to
responses.

A key bound to a site sees and changes only that site's clinicians, alerts and deliveries;
tenant-wide settings (partner subscriptions, the webhook signing secret, the escalation
interval) need a key that is not bound to a site, because they concern every site.
Acknowledging an alert is allowed to `read` keys: it is what a clinician does after reading it,
and it changes no configuration.

Alerts are of two types (`alert_type`): `alliance` (the SRS) and `outcome` (the ORS,
docs/outcome.md), listed side by side with the same lifecycle and the same endpoints.
An alert's `status` is `open`, `acknowledged`, or — decided by scoring — `superseded` (a later
session speaks for it) or `withdrawn` (a correction cleared it); see docs/clinical-records.md.
Its `routing` says who its latest revision reached: its `clinician`, the `fallback` entries of its
site (a directory entry with `fallback: true` receives its site's alerts that reach no
clinician), or `none`, with the `routing_reason` (docs/partners.md, "Alerts that reach no
clinician"). Fixing the directory afterwards (the entry, or an alias of it for an id the EHR
spells differently) sends the clinician their alerts still open that it stranded (services/alerts/reroute.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.alerts.rules import SUBSCRIBABLE, AlertType, Clinician, RoutedTo, url_problem
from services.alerts.secretbox import SecretBox
from services.alerts.service import (
    AlertsCommands,
    Invalid,
    NoSigningSecret,
    NotFound,
    NotPublished,
    Reroute,
    SiteForbidden,
    TenantWideOnly,
    TooManySubscriptions,
    no_reroute,
    tenant_wide,
)
from services.alerts.settings import AlertsSettings
from services.alerts.store import (
    Alert,
    AlertFields,
    AlertsStore,
    Delivery,
    DeliveryFields,
    DeliveryStatus,
    NameTaken,
    SubscriptionRow,
)
from services.alerts.targets import Resolver, system_resolve
from shared.audit import Auditor, note
from shared.auth import KeyStore, Principal, forbid_site, require
from shared.events import AlertState
from shared.http import error_body, error_response
from shared.kafka import Publisher
from shared.topics import Topics

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
Id = Annotated[str, Path(min_length=1, max_length=200)]
# The id rule intake applies to clinician ids, so the directory only holds ids events can carry.
CLINICIAN_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
ClinicianId = Annotated[str, Path(min_length=1, max_length=128, pattern=CLINICIAN_ID_PATTERN,
                                  description="1-128 characters of A-Za-z0-9._:-")]


class ClinicianIn(BaseModel):
    """A clinician's directory entry."""

    model_config = ConfigDict(extra="forbid")

    # Site and clinician ids follow intake's id rule like every id events carry (issue 12, ids).
    site_id: str = Field(min_length=1, max_length=128, pattern=CLINICIAN_ID_PATTERN,
                         description="1-128 characters of A-Za-z0-9._:-")
    email: str = Field(max_length=320, description="where alert emails go")
    webhook_url: str | None = Field(default=None, max_length=2000, description="optional http(s) endpoint")
    supervisor_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=CLINICIAN_ID_PATTERN,
                                      description="who gets unacknowledged alerts (a clinician id)")
    fallback: bool = Field(default=False, description=(
        "true: this entry (the site's duty clinician or clinical lead) also receives the alerts of its site whose "
        "clinician cannot be reached (no directory entry, an entry of another site, no usable channel), marked "
        "`x-alliance-routed: fallback` with the reason"))

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        if not _EMAIL.match(v):
            raise ValueError("not an email address")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and (problem := url_problem(v)):
            raise ValueError(problem)
        return v


class ClinicianOut(BaseModel):
    """A directory entry as stored (entries written before the id rule are still shown)."""

    clinician_id: str
    site_id: str
    email: str
    webhook_url: str | None = None
    supervisor_id: str | None = None
    fallback: bool = False
    aliases: list[str] = Field(default_factory=list, description=(
        "other ids alerts may name this clinician by (PUT /v1/clinicians/{clinician_id}/aliases/{alias_id})"))


def _clinician_out(c: Clinician, aliases: list[str]) -> ClinicianOut:
    return ClinicianOut(clinician_id=c.clinician_id, site_id=c.site_id, email=c.email or "",
                        webhook_url=c.webhook_url, supervisor_id=c.supervisor_id, fallback=c.fallback,
                        aliases=aliases)


def _name_taken(exc: NameTaken, field: str) -> HTTPException:
    return HTTPException(409, error_body([(field, f"{exc.name} is already a clinician id or another entry's alias "
                                                  "in this tenant")]))


class SubscriptionIn(BaseModel):
    """A partner webhook for some topics of the caller's tenant."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000)
    events: list[Literal["alliance.deterioration.v1", "srs.scored.v1", "alliance.alert-status.v1",
                         "ors.scored.v1", "outcome.alert.v1", "outcome.alert-status.v1"]] = Field(
        min_length=1, max_length=len(SUBSCRIBABLE),
        description="alliance.alert-status.v1: every status event of the tenant's alliance alerts (superseded, "
                    "withdrawn, acknowledged, escalated); ors.scored.v1, outcome.alert.v1 and "
                    "outcome.alert-status.v1: the same for the Outcome Rating Scale and its outcome alerts")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if problem := url_problem(v):
            raise ValueError(problem)
        return v


class SubscriptionOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime


class SubscriptionCreated(SubscriptionOut):
    secret: str = Field(description="whsec_... signing secret; shown only in this answer")


class SecretOut(BaseModel):
    secret: str = Field(description="whsec_... signing secret for clinician webhooks; shown only once")
    previous_valid_until: datetime | None = Field(
        default=None, description="until then webhooks carry a second signature made with the previous secret")


class EscalationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval_seconds: float | None = Field(gt=0, le=30 * 24 * 3600,
                                           description="null returns the tenant to the default")


class EscalationOut(BaseModel):
    interval_seconds: float
    default: bool


class AlertOut(AlertFields):
    """An alert as its latest raised revision describes it, with where its lifecycle stands.

    The content fields are null only while scoring's end of the alert (superseded, withdrawn) is
    known and the raise it ends has not arrived yet.
    """


class DeliveryOut(DeliveryFields):
    pass


def _alert(alert: Alert) -> AlertOut:
    return AlertOut.model_validate(alert.model_dump())  # leaves out what only the store keeps


def _delivery(delivery: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(delivery.model_dump())


def _subscription(row: SubscriptionRow) -> SubscriptionOut:
    return SubscriptionOut(id=row.subscription_id, url=row.url, events=list(row.events), created_at=row.created_at)


def _tenant_wide_only() -> HTTPException:
    return HTTPException(403, error_body([("Authorization", "tenant-wide settings need a key not bound to a site")]))


def _too_many_subscriptions(cap: int) -> HTTPException:
    return HTTPException(409, error_body([(None, f"a tenant may have at most {cap} subscriptions "
                                                 "(max_subscriptions_per_tenant): delete one first")]))


def _not_found_response(what: str) -> dict[str, Any]:
    return error_response(f"no such {what} in the key's tenant (or site)")


def _not_found(what: str) -> HTTPException:
    return HTTPException(404, error_body([(None, f"no such {what}")]))


def _note_alert(request: Request, p: Principal, alert: Alert | None) -> None:
    """The audit entry names the alert's client; another site's alert is answered 404 but audited as denied."""
    if alert is not None:
        note(request, client_id=alert.client_id, outcome=None if p.may_see_site(alert.site_id) else "denied")


def build_router(store: AlertsStore, keys: KeyStore, publisher: Publisher, topics: Topics, settings: AlertsSettings,
                 box: SecretBox, forget_secret: Callable[[str], None], wake: Callable[[], None],
                 auditor: Auditor | None = None, resolve: Resolver = system_resolve,
                 reroute: Reroute = no_reroute) -> APIRouter:
    """The /v1 routes. Alert and delivery reads and every change append an audit entry (`shared.audit`)."""
    commands = AlertsCommands(store, publisher, topics, wake, settings.allow_private_targets, resolve, settings, box,
                              forget_secret, reroute)
    read_key, admin_key = require(lambda: keys, "read"), require(lambda: keys, "admin")
    reader = Depends(read_key)
    audited = (auditor or Auditor(None, "alerts", keys.lookup)).route
    r = APIRouter(prefix="/v1", responses={"403": error_response(
        "the key's role may not do this, or the key is bound to another site (or to a site, for tenant-wide "
        "settings)")})

    @r.put("/clinicians/{clinician_id}", tags=["directory"], response_model=ClinicianOut,
           responses={201: {"description": "created"}, 422: {"description": "invalid body"},
                      409: error_response("a webhook_url while the tenant has no webhook signing secret: create "
                                          "one first with POST /v1/webhook-secret; or the id is another "
                                          "entry's alias")})
    async def put_clinician(clinician_id: ClinicianId, body: ClinicianIn, response: Response,
                            p: Principal = audited("clinician.put", admin_key, client_param=None,
                                                   target_param="clinician_id")) -> ClinicianOut:
        """Create or replace a clinician's directory entry."""
        try:
            created = await commands.put_clinician(p, Clinician(p.tenant_id, clinician_id, body.site_id, body.email,
                                                                body.webhook_url, body.supervisor_id, body.fallback))
        except SiteForbidden as exc:
            raise forbid_site(exc.site_id) from exc
        except Invalid as exc:
            raise HTTPException(422, error_body([(exc.field, exc.message)])) from exc
        except NoSigningSecret as exc:
            raise HTTPException(409, error_body([(exc.field, exc.message)])) from exc
        except NameTaken as exc:
            raise _name_taken(exc, "clinician_id") from exc
        response.status_code = 201 if created else 200
        aliases = (await store.aliases_of(p.tenant_id, [clinician_id])).get(clinician_id, [])
        return ClinicianOut(clinician_id=clinician_id, **body.model_dump(), aliases=aliases)

    @r.put("/clinicians/{clinician_id}/aliases/{alias_id}", tags=["directory"], response_model=ClinicianOut,
           responses={201: {"description": "created"}, "404": _not_found_response("clinician"),
                      409: error_response("the alias is already a clinician id or another entry's alias in the "
                                          "tenant")})
    async def put_alias(clinician_id: ClinicianId, alias_id: ClinicianId, response: Response,
                        p: Principal = audited("clinician.alias.put", admin_key, client_param=None,
                                               target_param="clinician_id")) -> ClinicianOut:
        """Let alerts name this clinician by another id too (one the EHR spells differently): they are
        routed to this entry, by the same site rule, and its stranded open alerts are sent now."""
        try:
            created = await commands.put_alias(p, clinician_id, alias_id)
        except SiteForbidden as exc:
            raise forbid_site(exc.site_id) from exc
        except NotFound as exc:
            raise _not_found(exc.what) from exc
        except Invalid as exc:
            raise HTTPException(422, error_body([(exc.field, exc.message)])) from exc
        except NameTaken as exc:
            raise _name_taken(exc, "alias_id") from exc
        response.status_code = 201 if created else 200
        return await _entry_out(p, clinician_id)

    @r.delete("/clinicians/{clinician_id}/aliases/{alias_id}", tags=["directory"], status_code=204,
              responses={"404": _not_found_response("clinician or alias")})
    async def delete_alias(clinician_id: ClinicianId, alias_id: ClinicianId,
                           p: Principal = audited("clinician.alias.delete", admin_key, client_param=None,
                                                  target_param="clinician_id")) -> Response:
        """Remove an alias: alerts naming it reach this clinician no more."""
        try:
            await commands.delete_alias(p, clinician_id, alias_id)
        except SiteForbidden as exc:
            raise forbid_site(exc.site_id) from exc
        except NotFound as exc:
            raise _not_found(exc.what) from exc
        return Response(status_code=204)

    async def _entry_out(p: Principal, clinician_id: str) -> ClinicianOut:
        c = await store.get_clinician(p.tenant_id, clinician_id)
        if c is None or not p.may_see_site(c.site_id):
            raise _not_found("clinician")
        return _clinician_out(c, (await store.aliases_of(p.tenant_id, [clinician_id])).get(clinician_id, []))

    @r.get("/clinicians/{clinician_id}", tags=["directory"], response_model=ClinicianOut,
           responses={"404": _not_found_response("clinician")})
    async def get_clinician(clinician_id: ClinicianId, p: Principal = reader) -> ClinicianOut:
        """One directory entry."""
        return await _entry_out(p, clinician_id)

    @r.get("/clinicians", tags=["directory"], response_model=list[ClinicianOut])
    async def list_clinicians(p: Principal = reader,
                              site_id: Annotated[str | None, Query(pattern=CLINICIAN_ID_PATTERN)] = None,
                              limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[ClinicianOut]:
        """The directory (a site-bound key sees its site only)."""
        if site_id is not None and not p.may_see_site(site_id):
            raise forbid_site(site_id)
        rows = await store.list_clinicians(p.tenant_id, p.site_id or site_id, limit)
        aliases = await store.aliases_of(p.tenant_id, (c.clinician_id for c in rows))
        return [_clinician_out(c, aliases.get(c.clinician_id, [])) for c in rows]

    @r.post("/subscriptions", tags=["subscriptions"], status_code=201, response_model=SubscriptionCreated,
            responses={409: {"description": "the tenant already has the most subscriptions allowed (20 by default)"}})
    async def create_subscription(body: SubscriptionIn,
                                  p: Principal = audited("subscription.create", admin_key)) -> SubscriptionCreated:
        """Subscribe a partner URL; the signing secret is in this answer only."""
        try:
            new = await commands.create_subscription(p, body.url, body.events)
        except TenantWideOnly as exc:
            raise _tenant_wide_only() from exc
        except Invalid as exc:
            raise HTTPException(422, error_body([(exc.field, exc.message)])) from exc
        except TooManySubscriptions as exc:
            raise _too_many_subscriptions(exc.cap) from exc
        return SubscriptionCreated(**_subscription(new.subscription).model_dump(), secret=new.secret)

    @r.get("/subscriptions", tags=["subscriptions"], response_model=list[SubscriptionOut])
    async def list_subscriptions(p: Principal = reader) -> list[SubscriptionOut]:
        """The tenant's subscriptions (never their secrets); tenant-wide keys only, like their writes."""
        try:
            tenant_wide(p)
        except TenantWideOnly as exc:
            raise _tenant_wide_only() from exc
        return [_subscription(row) for row in await store.list_subscriptions(p.tenant_id)]

    @r.delete("/subscriptions/{subscription_id}", tags=["subscriptions"], status_code=204,
              responses={"404": _not_found_response("subscription")})
    async def delete_subscription(subscription_id: Id,
                                  p: Principal = audited("subscription.delete", admin_key, client_param=None,
                                                         target_param="subscription_id")) -> Response:
        """Delete a subscription; its pending deliveries are cancelled."""
        try:
            await commands.delete_subscription(p, subscription_id)
        except TenantWideOnly as exc:
            raise _tenant_wide_only() from exc
        except NotFound as exc:
            raise _not_found(exc.what) from exc
        return Response(status_code=204)

    @r.post("/webhook-secret", tags=["directory"], status_code=201, response_model=SecretOut)
    async def rotate_secret(p: Principal = audited("webhook_secret.rotate", admin_key)) -> SecretOut:
        """Create or rotate the tenant's clinician-webhook signing secret (shown once)."""
        try:
            new = await commands.rotate_webhook_secret(p)
        except TenantWideOnly as exc:
            raise _tenant_wide_only() from exc
        return SecretOut(secret=new.secret, previous_valid_until=new.previous_valid_until)

    @r.put("/escalation", tags=["alerts"], response_model=EscalationOut)
    async def put_escalation(body: EscalationIn, p: Principal = audited("escalation.put", admin_key)) -> EscalationOut:
        """Set (or clear, with null) how long an alert may stay unacknowledged before it escalates."""
        try:
            escalation = await commands.set_escalation(p, body.interval_seconds)
        except TenantWideOnly as exc:
            raise _tenant_wide_only() from exc
        return EscalationOut(interval_seconds=escalation.interval_seconds, default=escalation.default)

    @r.get("/escalation", tags=["alerts"], response_model=EscalationOut)
    async def get_escalation(p: Principal = reader) -> EscalationOut:
        """The tenant's escalation interval."""
        escalation = await commands.escalation(p)
        return EscalationOut(interval_seconds=escalation.interval_seconds, default=escalation.default)

    @r.get("/alerts", tags=["alerts"], response_model=list[AlertOut])
    async def list_alerts(p: Principal = audited("alerts.list", read_key),
                          clinician_id: Annotated[str | None, Query(pattern=CLINICIAN_ID_PATTERN)] = None,
                          status: AlertState | None = None,
                          alert_type: Annotated[AlertType | None, Query(
                              description="alliance or outcome alerts only (default: both)")] = None,
                          routing: Annotated[RoutedTo | None, Query(
                              description="only alerts whose latest revision reached this: clinician, fallback "
                                          "or none (the unrouted alerts to look at)")] = None,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AlertOut]:
        """Alliance and outcome alerts, newest first (a site-bound key sees its site only)."""
        return [_alert(d) for d in await store.list_alerts(p.tenant_id, p.site_id, clinician_id, status, limit,
                                                           alert_type, routing)]

    @r.get("/alerts/{alert_id}", tags=["alerts"], response_model=AlertOut,
           responses={"404": _not_found_response("alert")})
    async def get_alert(request: Request, alert_id: Id,
                        p: Principal = audited("alert.read", read_key, target_param="alert_id")) -> AlertOut:
        """One alert."""
        alert = await store.get_alert(p.tenant_id, alert_id)
        _note_alert(request, p, alert)
        if alert is None or not p.may_see_site(alert.site_id):
            raise _not_found("alert")
        return _alert(alert)

    @r.post("/alerts/{alert_id}/ack", tags=["alerts"], response_model=AlertOut,
            responses={"404": _not_found_response("alert"),
                       503: {"description": "the status event could not be published; retry"}})
    async def ack(request: Request, alert_id: Id,
                  p: Principal = audited("alert.acknowledge", read_key, target_param="alert_id")) -> AlertOut:
        """Acknowledge an alert (idempotent); it will not escalate any more. A superseded or
        withdrawn alert is answered as it is: nothing is left to acknowledge."""
        try:
            return _alert(await commands.acknowledge(p, alert_id, seen=lambda alert: _note_alert(request, p, alert)))
        except NotFound as exc:
            raise _not_found(exc.what) from exc
        except NotPublished as exc:
            raise HTTPException(503, error_body([(None, str(exc))])) from exc

    @r.get("/deliveries", tags=["deliveries"], response_model=list[DeliveryOut])
    async def list_deliveries(p: Principal = audited("deliveries.list", read_key),
                              status: DeliveryStatus | None = None,
                              alert_id: str | None = None,
                              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeliveryOut]:
        """Deliveries, newest first; `status=failed` lists the dead-lettered ones."""
        rows = await store.list_deliveries(p.tenant_id, p.site_id, status, alert_id, limit)
        return [_delivery(d) for d in rows]

    @r.post("/deliveries/{delivery_id}/retry", tags=["deliveries"], response_model=DeliveryOut,
            responses={"404": _not_found_response("failed delivery")})
    async def retry(delivery_id: Id,
                    p: Principal = audited("delivery.retry", admin_key, client_param=None,
                                           target_param="delivery_id")) -> DeliveryOut:
        """Put a failed delivery back on the schedule with a fresh attempt budget."""
        try:
            return _delivery(await commands.requeue(p, delivery_id))
        except NotFound as exc:
            raise _not_found(exc.what) from exc

    return r
