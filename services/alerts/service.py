"""The alerts service's commands, apart from HTTP: put a clinician's directory entry, acknowledge
an alert, requeue a failed delivery. `api.py` parses requests, calls these and maps their errors
to responses; the rules of each command (who may, what is checked, what is stored, what is
published) live here.

Each command checks the caller's site against the entry it touches: a key bound to a site may
not see (`NotFound`) or change (`SiteForbidden`) another site's entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.alerts.handlers import PublishesAll, status_record
from services.alerts.rules import Clinician, status_changed
from services.alerts.store import utcnow
from services.alerts.targets import Resolver, system_resolve, target_problem
from shared.auth import Principal
from shared.events import AlertStatus
from shared.mongo import Document
from shared.topics import Topics


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


class NotPublished(Exception):
    """The command took effect, but the event telling others is not published yet: retry (the
    event id is stable, so a retry publishes the same event)."""


class CommandStore(Protocol):
    """What the commands need of the store (`AlertsStore`; an in-memory fake in the unit tests)."""

    async def get_clinician(self, tenant_id: str, clinician_id: str) -> Clinician | None: ...

    async def put_clinician(self, c: Clinician) -> bool: ...

    async def get_alert(self, tenant_id: str, alert_id: str) -> Document | None: ...

    async def acknowledge(self, tenant_id: str, alert_id: str, by: str) -> Document | None: ...

    async def get_delivery(self, tenant_id: str, delivery_id: str) -> Document | None: ...

    async def requeue_failed(self, tenant_id: str | None, delivery_ids: Sequence[str] | None = None) -> int: ...


# Told what a command found before it checks the caller's site (the audit trail names it).
Seen = Callable[[Document | None], None]


def _nothing(doc: Document | None) -> None:
    return None


@dataclass
class AlertsCommands:
    """The commands of the API, on the store, the publisher and the delivery worker's wake-up."""

    store: CommandStore
    publisher: PublishesAll
    topics: Topics
    wake: Callable[[], None]
    allow_private_targets: bool = False
    resolve: Resolver = system_resolve

    async def put_clinician(self, p: Principal, entry: Clinician) -> bool:
        """Create or replace a directory entry (of the caller's tenant); True when it is new.

        The caller must see both the entry's new site and its current one; a clinician cannot
        supervise themselves; a webhook must be a public http(s) target (unless private targets
        are allowed)."""
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
        return await self.store.put_clinician(entry)

    async def acknowledge(self, p: Principal, alert_id: str, seen: Seen = _nothing) -> Document:
        """Acknowledge an alert (idempotent) and publish `acknowledged`; the alert as it stands.

        A superseded or withdrawn alert is returned as it is: nothing is left to acknowledge. The
        status event is published on every call (stable event id), so a retry after
        `NotPublished` still tells reporting."""
        doc = await self.store.get_alert(p.tenant_id, alert_id)
        seen(doc)
        if doc is None or not p.may_see_site(doc["site_id"]):
            raise NotFound("alert")
        doc = await self.store.acknowledge(p.tenant_id, alert_id, p.key_id) or doc
        if doc.get("acknowledged_at") is None:
            return doc
        event = status_changed(p.tenant_id, alert_id, doc["site_id"], doc["clinician_id"], AlertStatus.ACKNOWLEDGED,
                               doc.get("acknowledged_at") or utcnow(), doc.get("client_id"))
        try:
            await self.publisher.publish_all([status_record(event, doc["client_id"], self.topics,
                                                            doc.get("correlation_id"))])
        except Exception as exc:
            raise NotPublished(f"acknowledged, but the status event is not published yet ({type(exc).__name__}); "
                               "retry") from exc
        return doc

    async def requeue(self, p: Principal, delivery_id: str) -> Document:
        """Put a failed delivery back on the schedule with a fresh attempt budget, and wake the
        worker; the delivery as it stands."""
        doc = await self.store.get_delivery(p.tenant_id, delivery_id)
        if doc is None or not p.may_see_site(doc["site_id"]) or doc["status"] != "failed":
            raise NotFound("failed delivery")
        await self.store.requeue_failed(p.tenant_id, [delivery_id])
        self.wake()
        return await self.store.get_delivery(p.tenant_id, delivery_id) or doc
