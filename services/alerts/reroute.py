"""Rerouting: a directory fix delivers the alerts it stranded no more (docs/operations.md,
"Rerouting stranded alerts").

An alert whose clinician could not be reached went to its site's fallbacks, or to nobody
(`routing` `fallback` / `none`). When an admin then puts the clinician's entry (registers them,
moves the entry to the alert's site, gives it a channel, changes a webhook that failed) or an alias
of it (an id the EHR spells differently), every alert of that clinician (under the entry's id or
any of its aliases) still open whose routed revision did not reach them is sent to them now
(`rules.plan_reroute` decides; the site rule holds: never another site's entry), its routing becomes
`clinician`, the fallbacks' deliveries of it still pending are cancelled, and
`alliance_alerts_rerouted_total{kind,reason}` counts it. Should every delivery to them then use up
its attempts, the status teller records who has it after all (services/alerts/statuses.py):
`fallback` again, the fallbacks' deliveries this cancelled scheduled again with fresh attempts (so a
reroute that does not get through never takes from the fallback what it would have got), and
nobody (`none`, told `failed`, `undelivered`) only when the fallbacks' deliveries fail too.

Exactly once per revision, under at-least-once
----------------------------------------------
Nothing is sent here: the clinician's deliveries are inserted into the delivery schedule under the
ids `plan_alert` derives for (revision, clinician, channel) — a second insert of the same id is a
no-op — and the delivery worker sends them, signed and retried as any other. The routing write
comes after the inserts and is conditional on the alert still being open and stranded at that
revision, so a crash between the two leaves a delivery that is already scheduled and a routing
still stranded; the next look inserts nothing new, and records the routing. Two processes looking at
once insert each id once; one of them changes the routing and counts it.

Who looks, and when
-------------------
The put itself (`AlertsCommands.put_clinician`), right after it stored the entry: the alerts go out
within the worker's next turn. And the same write that stores the entry sets its `reroute_owed`
flag, so the look is owed durably: every alerts process sweeps (every `status_sweep_seconds`) the
entries put more than `status_sweep_seconds` ago and still flagged, looks again, then unsets the
flag (conditional on the put it looked for: a later put keeps its own debt). That second look also
catches a raise that a handler routed from the directory as it was just before the put, but recorded
just after the first look.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol

from pydantic import ValidationError

from services.alerts import metrics
from services.alerts.handlers import delivery_doc
from services.alerts.rules import (
    Clinician,
    Reroute,
    StrandedAlert,
    UnroutedReason,
    alert_kind,
    kind_of,
    plan_reroute,
    raise_subject,
    recipient,
)
from services.alerts.settings import AlertsSettings
from services.alerts.store import utcnow
from shared.mongo import Document

log = logging.getLogger("alliance.alerts.reroute")


class RerouteStore(Protocol):
    """What rerouting needs of the store (`AlertsStore`)."""

    async def clinicians_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Clinician]: ...

    async def aliases_of(self, tenant_id: str, clinician_ids: Iterable[str]) -> dict[str, list[str]]: ...

    async def stranded_alerts(self, tenant_id: str, clinician_ids: Sequence[str]) -> list[Document]: ...

    async def clinician_tries(self, alert_ids: Iterable[str], recipient: str) -> dict[str, tuple[str, str]]: ...

    async def insert_deliveries(self, docs: Sequence[Document]) -> int: ...

    async def retarget_failed(self, retargets: Sequence[tuple[str, str]]) -> None: ...

    async def record_rerouted(self, reroutes: Sequence[tuple[str, int, UnroutedReason]]) -> set[str]: ...

    async def cancel_fallback_deliveries(self, revisions: Sequence[tuple[str, str]]) -> None: ...

    async def owed_reroutes(self, put_before: datetime, limit: int = 100) -> list[tuple[str, str, datetime]]: ...

    async def reroute_done(self, tenant_id: str, clinician_id: str, put_at: datetime) -> None: ...


def stranded_of(doc: Document) -> StrandedAlert | None:
    """A stored alert as `rules.plan_reroute` judges it; None when its body does not parse (logged)."""
    try:
        alert = kind_of(doc.get("alert_type")).raised_model().model_validate_json(doc["event"])
    except (KeyError, ValidationError):
        log.warning("a stranded alert's stored body does not parse: not rerouted", extra={"alert_id": doc.get("_id")})
        return None
    return StrandedAlert(alert, str(doc.get("status")), int(doc.get("rrev") or 0), doc.get("routing"),
                         doc.get("routing_reason"))


class Rerouter:
    """Sends a clinician the stranded alerts a directory change made reachable (see the module docstring)."""

    def __init__(self, store: RerouteStore, email_enabled: bool, wake: Callable[[], None],
                 settings: AlertsSettings) -> None:
        self._store = store
        self._email = email_enabled
        self._wake = wake
        self._settings = settings

    async def reroute(self, tenant_id: str, clinician_id: str) -> int:
        """Look at one clinician's stranded alerts (named by their id or any alias of their entry;
        `clinician_id` may be either) against their entry as stored now; how many alerts this call
        rerouted (another process may have recorded some of them first)."""
        entry = (await self._store.clinicians_for([(tenant_id, clinician_id)])).get((tenant_id, clinician_id))
        if entry is None:
            return 0
        own = entry.clinician_id
        names = [own, *(await self._store.aliases_of(tenant_id, [own])).get(own, [])]
        stored = {d["_id"]: d for d in await self._store.stranded_alerts(tenant_id, names)}
        found = [s for d in stored.values() if (s := stranded_of(d)) is not None]
        if not found:
            return 0
        tried = await self._store.clinician_tries((s.alert.alert_id for s in found), recipient("clinician", own))
        plans = [(s, r) for s in found
                 if (r := plan_reroute(s, replace(entry, alias=s.alert.clinician_id), self._email, tried)) is not None]
        if not plans:
            return 0
        now = utcnow()
        docs: list[Document] = []
        for s, r in plans:
            a, d = s.alert, stored[s.alert.alert_id]
            # The stored body as received (what the handler would have sent), its correlation and trace.
            docs.extend(delivery_doc(p, d["event"], a.accepted_at or a.occurred_at, d.get("correlation_id"), None,
                                     now, d.get("traceparent")) for p in r.new)
        # The deliveries first, the routing after: a crash in between is finished by the next look.
        await self._store.insert_deliveries(docs)
        await self._store.retarget_failed([(p.delivery_id, p.target) for _, r in plans for p in r.retry])
        changed = await self._store.record_rerouted([(r.alert_id, r.revision, r.reason) for _, r in plans])
        await self._store.cancel_fallback_deliveries([(s.alert.alert_id, raise_subject(s.alert)) for s, _ in plans])
        self._wake()
        for s, r in plans:
            if r.alert_id in changed:
                self._count(s, r)
        return len(changed)

    @staticmethod
    def _count(s: StrandedAlert, r: Reroute) -> None:
        metrics.REROUTED.labels(alert_kind(s.alert).alert_type, r.reason).inc()
        log.info("revision %d of an alert rerouted to its clinician after a directory change (was: %s)",
                 r.revision, r.reason, extra={"alert_id": r.alert_id})

    async def sweep(self) -> int:
        """Look again at every entry put more than `status_sweep_seconds` ago and still owed a look,
        then unset its flag; how many alerts it rerouted."""
        cutoff = utcnow() - timedelta(seconds=self._settings.status_sweep_seconds)
        n = 0
        for tenant_id, clinician_id, put_at in await self._store.owed_reroutes(cutoff):
            n += await self.reroute(tenant_id, clinician_id)
            await self._store.reroute_done(tenant_id, clinician_id, put_at)
        return n

    async def run(self) -> None:
        """Until cancelled: sweep every `status_sweep_seconds`. Failures only log: the flag stays."""
        while True:
            await asyncio.sleep(self._settings.status_sweep_seconds)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rerouting sweep failed; the entries stay owed")
