"""What partners and clinicians receive: the OpenAPI 3.1 `webhooks` of the alerts API.

Documentation only: no route serves these. The delivery worker sends them (`senders.WebhookSender`,
headers from `signing.webhook_headers`). Each webhook is named after its topic, and its body is the
topic's event JSON, byte for byte the Kafka record value the alerts service consumed; what may be
subscribed is `rules.SUBSCRIBABLE`. A unit test keeps the documented headers equal to the ones
`signing.webhook_headers` sends.
"""

# No `from __future__ import annotations`: the routes' annotations are built from each webhook's
# channel at run time, so FastAPI must see them evaluated.
import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Response

from services.alerts import signing
from services.alerts.settings import AlertsSettings
from shared import channels
from shared.channels import Channel

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


# The headers of a site fallback's copy of an alert or of its withdrawal (docs/partners.md, "Alerts
# that reach no clinician").
RoutedCopy = Annotated[Literal["fallback"] | None, Header(description=(
    "present on the copy a fallback entry of the alert's site gets because the alert's clinician cannot be "
    "reached"))]
RoutedReason = Annotated[Literal["no_directory_entry", "other_site", "no_channel"] | None, Header(description=(
    "with `x-alliance-routed`: why the clinician was not reached (no directory entry under the alert's "
    "clinician_id, an entry of another site only, or no usable webhook or email)"))]


def _event(topic: str) -> Any:
    return Header(description="the topic of the body", json_schema_extra={"enum": [topic]})


@dataclass(frozen=True)
class Webhook:
    """One webhook: the topic it is named after and whose event is its body (its channel), and what
    the API document says of it. An alert's webhook also goes to the clinician's supervisor on
    escalation, marked by a header."""

    channel: Channel[Any]
    operation_id: str
    summary: str
    doc: str
    escalation_copy: bool = False
    fallback_copy: bool = False  # also sent to a site's fallback entries (alerts and their withdrawals)

    @property
    def description(self) -> str:
        return inspect.cleandoc(self.doc)

    def endpoint(self) -> Any:
        """The documentation-only route: the body is the channel's event, the headers every webhook
        carries, `x-alliance-event` the topic, and on an alert's webhook the escalation header."""
        topic = Annotated[str, _event(self.channel.topic)]
        route: Any
        if self.escalation_copy:
            async def alert(body: Any, _: Signed, x_alliance_event: topic,
                            x_alliance_escalation: EscalationCopy = None, x_alliance_routed: RoutedCopy = None,
                            x_alliance_routed_reason: RoutedReason = None) -> None:
                """See `Webhook.doc`."""
            route = alert
        elif self.fallback_copy:
            async def status(body: Any, _: Signed, x_alliance_event: topic, x_alliance_routed: RoutedCopy = None,
                             x_alliance_routed_reason: RoutedReason = None) -> None:
                """See `Webhook.doc`."""
            route = status
        else:
            async def event(body: Any, _: Signed, x_alliance_event: topic) -> None:
                """See `Webhook.doc`."""
            route = event
        route.__annotations__["body"] = self.channel.model
        return route


WEBHOOKS: tuple[Webhook, ...] = (
    Webhook(channels.DETERIORATION, "deterioration_webhook", "An alert raised, or revised by a correction", """
        Sent to the partners of the alert's tenant subscribed to `alliance.deterioration.v1`, to the alert's
        clinician when their directory entry has a `webhook_url` (signed with the tenant's clinician-webhook
        secret), and to their supervisor on escalation. When the clinician cannot be reached, to the fallback
        entries of the alert's site instead, with `x-alliance-routed: fallback` and the reason. Keep the highest
        `revision` per `alert_id`.""", escalation_copy=True),
    Webhook(channels.SCORED, "scored_webhook", "One revision of a scored session", """
        Sent to the partners of the session's tenant subscribed to `srs.scored.v1`. Keep the highest
        `revision` per `submission_id`."""),
    Webhook(channels.ALERT_STATUS, "alert_status_webhook", "What happened to an alert", """
        Every status is sent to the partners of the alert's tenant subscribed to `alliance.alert-status.v1`;
        a `withdrawn` status also to the clinician who may have been told of the alert, when their directory
        entry has a `webhook_url` (to the site's fallback entries, marked like the alert, when the clinician
        cannot be reached). A `failed` without a `channel` says the revision reached no person at all, and
        `routing_reason` why.""", fallback_copy=True),
    # The Outcome Rating Scale (docs/outcome.md): its own event types, so an SRS partner never receives them
    # unless it subscribes to them.
    Webhook(channels.OUTCOME_ALERT, "outcome_alert_webhook", "An outcome alert raised, or revised by a correction",
            """
        Sent to the partners of the alert's tenant subscribed to `outcome.alert.v1`, to the alert's clinician
        when their directory entry has a `webhook_url` (signed with the tenant's clinician-webhook secret, like an
        alliance alert), and to their supervisor on escalation; to the site's fallback entries, marked
        `x-alliance-routed: fallback`, when the clinician cannot be reached. `advice` says what to do about it.
        Keep the highest `revision` per `alert_id`.""", escalation_copy=True),
    Webhook(channels.ORS_SCORED, "ors_scored_webhook", "One revision of a scored ORS session", """
        Sent to the partners of the session's tenant subscribed to `ors.scored.v1`. Keep the highest
        `revision` per `submission_id`."""),
    Webhook(channels.OUTCOME_ALERT_STATUS, "outcome_alert_status_webhook", "What happened to an outcome alert", """
        Every status of an outcome alert is sent to the partners of its tenant subscribed to
        `outcome.alert-status.v1` (never on `alliance.alert-status.v1`); a `withdrawn` status also to the
        clinician who may have been told of the alert, when their directory entry has a `webhook_url` (or to the
        site's fallback entries, as for the alert). A `failed` without a `channel` says the revision reached no
        person at all, and `routing_reason` why.""", fallback_copy=True),
)


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

    for hook in WEBHOOKS:
        router.post(hook.channel.topic, operation_id=hook.operation_id, summary=hook.summary,
                    description=hook.description, **answers)(hook.endpoint())

    return router
