"""The alerts service's commands, apart from HTTP: put a clinician's directory entry, acknowledge
an alert, requeue a failed delivery, create or delete a partner subscription, rotate the tenant's
webhook signing secret, set its escalation interval. `api.py` parses requests, calls these and
maps their errors to responses; the rules of each command (who may, what is checked, what is
stored, what is published) live here.

Each command checks the caller's site against the entry it touches: a key bound to a site may
not see (`NotFound`) or change (`SiteForbidden`) another site's entries. Tenant-wide settings
(subscriptions, the signing secret, the escalation interval) concern every site: they need a key
bound to none (`TenantWideOnly`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from services.alerts import signing
from services.alerts.handlers import PublishesAll, status_record
from services.alerts.rules import SUBSCRIBABLE, Clinician, kind_of, status_changed
from services.alerts.secretbox import SecretBox, subscription_row, tenant_row
from services.alerts.settings import AlertsSettings
from services.alerts.store import Alert, Delivery, SubscriptionRow
from services.alerts.targets import Resolver, system_resolve, target_problem
from shared import tracing
from shared.auth import Principal
from shared.events import AlertStatus
from shared.topics import Topics

log = logging.getLogger("alliance.alerts.service")


class NotFound(Exception):
    """No such entry in the caller's tenant (or site)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"no such {what}")
        self.what = what


class SiteForbidden(Exception):
    """The caller's key is bound to another site than the entry's."""

    def __init__(self, site_id: str) -> None:
        super().__init__(site_id)
        self.site_id = site_id


class Invalid(Exception):
    """A field of the command breaks a rule the request's schema cannot express."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TenantWideOnly(Exception):
    """A tenant-wide setting asked for with a key bound to a site."""


class TooManySubscriptions(Exception):
    """The tenant has the most subscriptions allowed."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"at most {cap} subscriptions")
        self.cap = cap


class NoSigningSecret(Exception):
    """A clinician webhook while the tenant has no signing secret: nothing could sign its
    deliveries, which would retry until they fail. Refused, naming the fix."""

    field = "webhook_url"
    message = ("the tenant has no webhook signing secret, so no delivery to this webhook could be signed: "
               "an admin with a tenant-wide key creates one with POST /v1/webhook-secret (shown once), "
               "then puts the clinician again")

    def __init__(self) -> None:
        super().__init__(self.message)


class NotPublished(Exception):
    """The command took effect, but the event telling others is not published yet: retry (the
    event id is stable, so a retry publishes the same event)."""


class CommandStore(Protocol):
    """What the commands need of the store (`AlertsStore`; an in-memory fake in the unit tests)."""

    async def get_clinician(self, tenant_id: str, clinician_id: str) -> Clinician | None: ...

    async def put_clinician(self, c: Clinician) -> bool: ...

    async def put_alias(self, tenant_id: str, alias_id: str, clinician_id: str) -> bool: ...

    async def delete_alias(self, tenant_id: str, alias_id: str, clinician_id: str) -> bool: ...

    async def has_webhook_secret(self, tenant_id: str) -> bool: ...

    async def get_alert(self, tenant_id: str, alert_id: str) -> Alert | None: ...

    async def acknowledge(self, tenant_id: str, alert_id: str, by: str) -> Alert | None: ...

    async def get_delivery(self, tenant_id: str, delivery_id: str) -> Delivery | None: ...

    async def requeue_failed(self, tenant_id: str | None, delivery_ids: Sequence[str] | None = None) -> int: ...

    @staticmethod
    def new_subscription_id() -> str: ...

    async def create_subscription(self, tenant_id: str, url: str, events: Sequence[str], sealed_secret: str,
                                  subscription_id: str | None = None) -> SubscriptionRow: ...

    async def count_subscriptions(self, tenant_id: str) -> int: ...

    async def remove_subscription(self, tenant_id: str, subscription_id: str) -> None: ...

    async def delete_subscription(self, tenant_id: str, subscription_id: str) -> bool: ...

    async def rotate_webhook_secret(self, tenant_id: str, sealed_secret: str,
                                    grace: timedelta) -> datetime | None: ...

    async def escalation_seconds(self, tenant_id: str) -> float | None: ...

    async def set_escalation(self, tenant_id: str, seconds: float | None) -> None: ...


# Sends a clinician the stranded alerts their entry now reaches (`reroute.Rerouter.reroute`): (tenant,
# clinician) -> how many alerts it rerouted.
Reroute = Callable[[str, str], Awaitable[int]]


async def no_reroute(tenant_id: str, clinician_id: str) -> int:
    return 0


# Told what a command found before it checks the caller's site (the audit trail names it).
Seen = Callable[[Alert | None], None]


def _nothing(alert: Alert | None) -> None:
    return None


def _forget_nothing(cache_key: str) -> None:
    return None


def tenant_wide(p: Principal) -> None:
    """Refuse a key bound to a site (`TenantWideOnly`): the setting concerns every site."""
    if p.site_id is not None:
        raise TenantWideOnly()


@dataclass(frozen=True)
class NewSubscription:
    """A subscription just created, with its signing secret (shown once, never stored in clear)."""

    subscription: SubscriptionRow
    secret: str


@dataclass(frozen=True)
class NewSecret:
    """A tenant's new clinician-webhook signing secret (shown once); until `previous_valid_until`
    webhooks also carry a signature made with the previous one."""

    secret: str
    previous_valid_until: datetime | None


@dataclass(frozen=True)
class Escalation:
    """How long an alert may stay unacknowledged before it escalates; `default` when the tenant
    has no interval of its own."""

    interval_seconds: float
    default: bool


@dataclass
class AlertsCommands:
    """The commands of the API, on the store, the publisher and the delivery worker's wake-up."""

    store: CommandStore
    publisher: PublishesAll
    topics: Topics
    wake: Callable[[], None]
    allow_private_targets: bool = False
    resolve: Resolver = system_resolve
    settings: AlertsSettings = field(default_factory=AlertsSettings)  # the subscription cap, grace, interval
    box: SecretBox = field(default_factory=SecretBox)  # seals signing secrets (no keyring: stored as they are)
    forget_secret: Callable[[str], None] = _forget_nothing  # drops a cached secret (the senders')
    reroute: Reroute = no_reroute  # delivers the stranded alerts a directory change unstrands

    async def put_clinician(self, p: Principal, entry: Clinician) -> bool:
        """Create or replace a directory entry (of the caller's tenant); True when it is new.

        The caller must see both the entry's new site and its current one; a clinician cannot
        supervise themselves; a webhook must be a public http(s) target (unless private targets
        are allowed) and the tenant must have a signing secret for it."""
        if not p.may_see_site(entry.site_id):
            raise SiteForbidden(entry.site_id)
        existing = await self.store.get_clinician(p.tenant_id, entry.clinician_id)
        if existing is not None and not p.may_see_site(existing.site_id):
            raise SiteForbidden(existing.site_id)
        if entry.supervisor_id == entry.clinician_id:
            raise Invalid("supervisor_id", "a clinician cannot supervise themselves")
        if entry.webhook_url and (problem := await target_problem(entry.webhook_url, self.allow_private_targets,
                                                                       self.resolve)):
            raise Invalid("webhook_url", problem)
        if entry.webhook_url and not await self.store.has_webhook_secret(p.tenant_id):
            raise NoSigningSecret()
        created = await self.store.put_clinician(entry)
        await self._reroute(p.tenant_id, entry.clinician_id)
        return created

    async def _reroute(self, tenant_id: str, name: str) -> None:
        """Send the clinician their stranded alerts at once, so they hear of them within seconds; the
        entry or alias stays owed a look (stored with it), so a failure here is only late, never lost."""
        try:
            await self.reroute(tenant_id, name)
        except Exception:
            log.exception("rerouting after a directory change failed; the sweep looks again")

    async def _own_entry(self, p: Principal, clinician_id: str) -> Clinician:
        """The caller's tenant's entry `clinician_id`, which the caller's key must see (as for a put)."""
        entry = await self.store.get_clinician(p.tenant_id, clinician_id)
        if entry is None:
            raise NotFound("clinician")
        if not p.may_see_site(entry.site_id):
            raise SiteForbidden(entry.site_id)
        return entry

    async def put_alias(self, p: Principal, clinician_id: str, alias_id: str) -> bool:
        """Make `alias_id` (an id the EHR sends for this clinician) an alias of their entry: alerts
        naming it are routed to the entry, by the same site rule, and its stranded open alerts are
        sent to them now. True when it is new; `NameTaken` when the id is already an entry's or
        another entry's alias in the tenant."""
        if alias_id == clinician_id:
            raise Invalid("alias_id", "an alias is another id than the entry's own")
        entry = await self._own_entry(p, clinician_id)
        created = await self.store.put_alias(p.tenant_id, alias_id, entry.clinician_id)
        await self._reroute(p.tenant_id, alias_id)
        return created

    async def delete_alias(self, p: Principal, clinician_id: str, alias_id: str) -> None:
        """Remove an alias of the entry (alerts naming it reach no clinician from then on)."""
        await self._own_entry(p, clinician_id)
        if not await self.store.delete_alias(p.tenant_id, alias_id, clinician_id):
            raise NotFound("alias")

    async def acknowledge(self, p: Principal, alert_id: str, seen: Seen = _nothing) -> Alert:
        """Acknowledge an alert (idempotent) and publish `acknowledged` on its type's status topic
        (`alliance.alert-status.v1`, `outcome.alert-status.v1`); the alert as it stands.

        A superseded or withdrawn alert is returned as it is: nothing is left to acknowledge. The
        status event is published on every call (stable event id), so a retry after
        `NotPublished` still tells reporting."""
        alert = await self.store.get_alert(p.tenant_id, alert_id)
        seen(alert)
        if alert is None or not p.may_see_site(alert.site_id):
            raise NotFound("alert")
        alert = await self.store.acknowledge(p.tenant_id, alert_id, p.key_id) or alert
        # Every alert names its client (a raise and a lifecycle status both carry it): the status
        # event is keyed by it, like the client's other events.
        if alert.acknowledged_at is None or alert.client_id is None:
            return alert
        kind = kind_of(alert.alert_type)
        event = status_changed(p.tenant_id, alert_id, alert.site_id, alert.clinician_id, AlertStatus.ACKNOWLEDGED,
                               alert.acknowledged_at, alert.client_id, kind)
        try:
            # The status event continues the trace of the acknowledging request, not the alert's.
            await self.publisher.publish_all([status_record(event, alert.client_id, self.topics, alert.correlation_id,
                                                            tracing.current_traceparent(), kind)])
        except Exception as exc:
            raise NotPublished(f"acknowledged, but the status event is not published yet ({type(exc).__name__}); "
                               "retry") from exc
        return alert

    async def requeue(self, p: Principal, delivery_id: str) -> Delivery:
        """Put a failed delivery back on the schedule with a fresh attempt budget, and wake the
        worker; the delivery as it stands."""
        delivery = await self.store.get_delivery(p.tenant_id, delivery_id)
        if delivery is None or not p.may_see_site(delivery.site_id) or delivery.status != "failed":
            raise NotFound("failed delivery")
        await self.store.requeue_failed(p.tenant_id, [delivery_id])
        self.wake()
        return await self.store.get_delivery(p.tenant_id, delivery_id) or delivery

    async def create_subscription(self, p: Principal, url: str, events: Sequence[str]) -> NewSubscription:
        """Subscribe a partner URL (a public http(s) target, unless private targets are allowed) to
        some topics of the caller's tenant, with a new signing secret sealed to its row; at most
        `max_subscriptions_per_tenant` per tenant."""
        tenant_wide(p)
        if problem := await target_problem(url, self.allow_private_targets, self.resolve):
            raise Invalid("url", problem)
        cap = self.settings.max_subscriptions_per_tenant
        if await self.store.count_subscriptions(p.tenant_id) >= cap:
            raise TooManySubscriptions(cap)
        secret = signing.new_secret()
        subscription_id = self.store.new_subscription_id()
        sealed = self.box.seal(secret, subscription_row(p.tenant_id, subscription_id))
        row = await self.store.create_subscription(p.tenant_id, url, sorted(set(events), key=SUBSCRIBABLE.index),
                                                   sealed, subscription_id)
        if await self.store.count_subscriptions(p.tenant_id) > cap:
            # Two creations raced past the check above: undo this one (both may be undone; the
            # caller retries), so the cap holds.
            await self.store.remove_subscription(p.tenant_id, subscription_id)
            raise TooManySubscriptions(cap)
        return NewSubscription(row, secret)

    async def delete_subscription(self, p: Principal, subscription_id: str) -> None:
        """Delete a subscription (its pending deliveries are cancelled) and forget its cached secret."""
        tenant_wide(p)
        if not await self.store.delete_subscription(p.tenant_id, subscription_id):
            raise NotFound("subscription")
        self.forget_secret("sub:" + subscription_id)

    async def rotate_webhook_secret(self, p: Principal) -> NewSecret:
        """Create or rotate the tenant's clinician-webhook signing secret; the previous one keeps
        signing for `secret_rotation_grace_seconds`."""
        tenant_wide(p)
        secret = signing.new_secret()
        grace = timedelta(seconds=self.settings.secret_rotation_grace_seconds)
        until = await self.store.rotate_webhook_secret(p.tenant_id, self.box.seal(secret, tenant_row(p.tenant_id)),
                                                        grace)
        self.forget_secret("tenant:" + p.tenant_id)
        return NewSecret(secret, until)

    async def set_escalation(self, p: Principal, seconds: float | None) -> Escalation:
        """Set the tenant's escalation interval, or (None) return it to the default."""
        tenant_wide(p)
        await self.store.set_escalation(p.tenant_id, seconds)
        return Escalation(seconds or self.settings.escalation_seconds, seconds is None)

    async def escalation(self, p: Principal) -> Escalation:
        """The tenant's escalation interval."""
        seconds = await self.store.escalation_seconds(p.tenant_id)
        return Escalation(seconds or self.settings.escalation_seconds, seconds is None)
