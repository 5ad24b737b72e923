"""What partners and clinicians receive: the OpenAPI 3.1 `webhooks` of the alerts API.

Documentation only: no route serves these. The delivery worker sends them (`senders.WebhookSender`,
headers from `signing.webhook_headers`). Each webhook is named after its topic, and its body is the
topic's event JSON, byte for byte the Kafka record value the alerts service consumed; what may be
subscribed is `rules.SUBSCRIBABLE`. A unit test keeps the documented headers equal to the ones
`signing.webhook_headers` sends.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Response

from services.alerts import signing
from services.alerts.settings import AlertsSettings
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    SrsScored,
)
from shared.topics import ALERT_STATUS, DETERIORATION, ORS_SCORED, OUTCOME_ALERT, OUTCOME_ALERT_STATUS, SCORED

_SIGNATURE = r"^v1,[A-Za-z0-9+/]+={0,2}( v1,[A-Za-z0-9+/]+={0,2})*$"


def _signed(
    webhook_id: Annotated[str, Header(description=(
        "the delivery id: the same on every retry of this delivery, so dedupe on it (Standard Webhooks)"))],
    webhook_timestamp: Annotated[int, Header(description=(
        "Unix time of this attempt in seconds; refuse one more than 5 minutes away from your clock"))],
    webhook_signature: Annotated[str, Header(pattern=_SIGNATURE, description=(
        "`v1,<base64 HMAC-SHA256>` of `<webhook-id>.<webhook-timestamp>.<raw body>`, keyed with the base64 "
        "key after `whsec_` of the signing secret (a subscription's own, or the tenant's clinician-webhook "
        "secret); during a secret rotation one signature per valid secret, separated by spaces. Verify it "
        "on the raw body bytes: docs/partners.md, *Verifying the signature*"))],
    x_alliance_delivery: Annotated[str, Header(description="the delivery id again (same as `webhook-id`)")],
    user_agent: Annotated[str, Header(description=f"`{signing.USER_AGENT}`")],
) -> None:
    """The headers every webhook request carries (a dependency, so each webhook lists them)."""


Signed = Annotated[None, Depends(_signed)]
# The header of an alert webhook's escalation copy (alliance and outcome alerts alike).
EscalationCopy = Annotated[Literal["true"] | None, Header(description=(
    "present on the copy a clinician's supervisor gets when the alert was not acknowledged in time"))]


def _event(topic: str) -> Any:
    return Header(description="the topic of the body", json_schema_extra={"enum": [topic]})


def webhooks_router(settings: AlertsSettings) -> APIRouter:
    """The webhooks as routes of an `APIRouter`, for `FastAPI.webhooks`."""
    router = APIRouter(tags=["webhooks"])
    answers: dict[str, Any] = {
        "response_class": Response,
        "response_description": "stored: any 2xx counts as delivered; the answer's body is not read",
        "responses": {"default": {"description": (
            f"any other status, a redirect (not followed) or no answer within {settings.attempt_timeout_seconds:g} "
            f"s: the attempt failed and is retried with exponential backoff, up to {settings.max_attempts} attempts; "
            "then the delivery is marked failed and dead-lettered (an admin re-queues it with "
            "`POST /v1/deliveries/{delivery_id}/retry`)")}},
    }

    @router.post(DETERIORATION, operation_id="deterioration_webhook", **answers,
                 summary="An alert raised, or revised by a correction")
    async def deterioration(
        body: AllianceDeterioration, _: Signed,
        x_alliance_event: Annotated[str, _event(DETERIORATION)],
        x_alliance_escalation: EscalationCopy = None,
    ) -> None:
        """Sent to the partners of the alert's tenant subscribed to `alliance.deterioration.v1`, to the alert's
        clinician when their directory entry has a `webhook_url` (signed with the tenant's clinician-webhook
        secret), and to their supervisor on escalation. Keep the highest `revision` per `alert_id`."""

    @router.post(SCORED, operation_id="scored_webhook", **answers, summary="One revision of a scored session")
    async def scored(body: SrsScored, _: Signed, x_alliance_event: Annotated[str, _event(SCORED)]) -> None:
        """Sent to the partners of the session's tenant subscribed to `srs.scored.v1`. Keep the highest
        `revision` per `submission_id`."""

    @router.post(ALERT_STATUS, operation_id="alert_status_webhook", **answers, summary="What happened to an alert")
    async def alert_status(body: AlertStatusChanged, _: Signed,
                           x_alliance_event: Annotated[str, _event(ALERT_STATUS)]) -> None:
        """Every status is sent to the partners of the alert's tenant subscribed to `alliance.alert-status.v1`;
        a `withdrawn` status also to the clinician who may have been told of the alert, when their directory
        entry has a `webhook_url`."""

    # The Outcome Rating Scale (docs/outcome.md): its own event types, so an SRS partner never receives them
    # unless it subscribes to them.
    @router.post(OUTCOME_ALERT, operation_id="outcome_alert_webhook", **answers,
                 summary="An outcome alert raised, or revised by a correction")
    async def outcome_alert(
        body: OutcomeAlert, _: Signed,
        x_alliance_event: Annotated[str, _event(OUTCOME_ALERT)],
        x_alliance_escalation: EscalationCopy = None,
    ) -> None:
        """Sent to the partners of the alert's tenant subscribed to `outcome.alert.v1`, to the alert's clinician
        when their directory entry has a `webhook_url` (signed with the tenant's clinician-webhook secret, like an
        alliance alert), and to their supervisor on escalation. `advice` says what to do about it. Keep the
        highest `revision` per `alert_id`."""

    @router.post(ORS_SCORED, operation_id="ors_scored_webhook", **answers,
                 summary="One revision of a scored ORS session")
    async def ors_scored(body: OrsScored, _: Signed, x_alliance_event: Annotated[str, _event(ORS_SCORED)]) -> None:
        """Sent to the partners of the session's tenant subscribed to `ors.scored.v1`. Keep the highest
        `revision` per `submission_id`."""

    @router.post(OUTCOME_ALERT_STATUS, operation_id="outcome_alert_status_webhook", **answers,
                 summary="What happened to an outcome alert")
    async def outcome_alert_status(body: OutcomeAlertStatusChanged, _: Signed,
                                   x_alliance_event: Annotated[str, _event(OUTCOME_ALERT_STATUS)]) -> None:
        """Every status of an outcome alert is sent to the partners of its tenant subscribed to
        `outcome.alert-status.v1` (never on `alliance.alert-status.v1`); a `withdrawn` status also to the
        clinician who may have been told of the alert, when their directory entry has a `webhook_url`."""

    return router
