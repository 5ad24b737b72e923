"""Escalation: an alert left unacknowledged past its tenant's interval goes once to the supervisor.

Each tick finds due alerts (open: not acknowledged, superseded or withdrawn; never escalated;
created before now - interval; the interval is the tenant's override or the default),
schedules the supervisor's deliveries (unique ids), publishes `escalated` on the alert's type's
status topic (stable event id) and only then marks the alerts escalated. Every step is idempotent, so two
processes ticking at once, or a crash between steps, can at worst repeat a step without a
second delivery. An alert whose clinician has no supervisor in the directory (or one without
any channel, or one of another site) is marked escalated with nobody to tell, and no status
event is published for it.

An alert whose clinician has no directory entry at all (it went to its site's fallback entries:
`routing_fallbacks` on the alert) escalates to the supervisor of the first of those entries that
names one (`rules.escalation_supervisor`), under the same site rule; an alert that reached nobody
has no fallback to look through, and is marked escalated with nobody to tell, as above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.alerts import metrics
from services.alerts.handlers import delivery_doc, status_record
from services.alerts.rules import (
    due_for_escalation_filter,
    escalation_supervisor,
    kind_of,
    route_escalation,
    status_changed,
)
from services.alerts.settings import AlertsSettings
from services.alerts.store import AlertsStore
from shared.events import AlertStatus
from shared.kafka import Publisher
from shared.mongo import Document
from shared.topics import Topics

log = logging.getLogger("alliance.alerts.escalation")


@dataclass(eq=False)
class Escalator:
    """Periodically escalates overdue alerts."""

    store: AlertsStore
    publisher: Publisher
    topics: Topics
    settings: AlertsSettings
    email_enabled: bool
    # Wakes the delivery worker once escalation deliveries are scheduled.
    on_scheduled: Callable[[], None]
    batch: int = 200

    async def run(self) -> None:
        """Tick until cancelled; a failed tick (store or broker down) is retried on the next one."""
        while True:
            try:
                while await self.tick() == self.batch:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("escalation tick failed: %r", exc)
            await asyncio.sleep(self.settings.escalation_check_seconds)

    async def tick(self) -> int:
        """Escalate what is due now; returns how many alerts it handled."""
        now = datetime.now(UTC)
        overrides = await self.store.escalation_overrides()
        pairs = due_for_escalation_filter(now.timestamp(), self.settings.escalation_seconds, overrides)
        due = await self.store.due_escalations(
            [(t, datetime.fromtimestamp(cut, UTC)) for t, cut in pairs], self.batch)
        if not due:
            return 0
        clinicians = await self.store.clinicians_for((a["tenant_id"], a["clinician_id"]) for a in due)
        # The fallback entries told of the alerts whose clinician has no entry: read only when there are some.
        missing = [a for a in due if (a["tenant_id"], a["clinician_id"]) not in clinicians]
        fallbacks = await self.store.clinicians_for(
            (a["tenant_id"], f) for a in missing for f in a.get("routing_fallbacks") or ())
        supervisor_of: dict[str, str | None] = {}
        for a in due:
            told = [fb for f in a.get("routing_fallbacks") or () if (fb := fallbacks.get((a["tenant_id"], f)))]
            supervisor_of[a["_id"]] = escalation_supervisor(clinicians.get((a["tenant_id"], a["clinician_id"])), told)
        supervisors = await self.store.clinicians_for(
            (a["tenant_id"], sup) for a in due if (sup := supervisor_of[a["_id"]]) is not None)
        docs: list[Document] = []
        records = []
        outcomes: list[tuple[str, str | None]] = []

        for a in due:
            sup_id = supervisor_of[a["_id"]]
            supervisor = supervisors.get((a["tenant_id"], sup_id)) if sup_id is not None else None
            kind = kind_of(a.get("alert_type"))
            alert = kind.raised_model().model_validate_json(a["event"])
            planned = route_escalation(alert, supervisor, self.email_enabled)
            docs.extend(delivery_doc(p, a["event"], now, a.get("correlation_id"), None, now, a.get("traceparent"))
                        for p in planned)
            if planned:
                event = status_changed(a["tenant_id"], a["_id"], a["site_id"], a["clinician_id"],
                                       AlertStatus.ESCALATED, now, a.get("client_id"), kind)
                records.append(status_record(event, a["client_id"], self.topics, a.get("correlation_id"),
                                             a.get("traceparent"), kind))
            # Marked either way, so an alert without a reachable supervisor is not looked at again.
            outcomes.append((a["_id"], supervisor.clinician_id if planned and supervisor is not None else None))
            metrics.ESCALATIONS.labels("sent" if planned else "no_supervisor").inc()
        inserted = await self.store.insert_deliveries(docs)
        await self.publisher.publish_all(records)
        await self.store.mark_escalated(outcomes)
        if inserted:
            self.on_scheduled()
        log.info("escalated %d alerts (%d deliveries)", len(due), inserted)
        return len(due)
