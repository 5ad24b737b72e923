"""Tools to drive the alerts service from the outside, shared by its benchmark and its tests.

- `EventPublisher`: publishes contract events straight onto a topic, keyed like production.
- `deterioration` / `scored`: the events scoring itself publishes for a client's sessions: they
  are run through scoring's own state (`series.ClientState`, default tenant rules) and event
  builders (`handlers.alert_event` / `scored_event`), so ids, triggers and severity are scoring's;
  `revised` and `ended` build the later revisions and the superseded / withdrawn statuses of an
  alert with the ids of `shared/ids.py`.

The webhook receiver is `tools/receiver.py`, the topic recorder `tools/recorder.py`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from services.scoring.handlers import alert_event, scored_event
from services.scoring.rules import TenantRules
from services.scoring.series import AlertOut, ClientState, Output, ScoredOut, Version, version_of
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, Instrument, SrsScored

RULES = TenantRules()  # scoring's defaults: cutoff 36.0, a drop of 1.0, critical from a drop below the cutoff


class EventPublisher:
    """Publishes events the way scoring does: JSON, key `tenant:client`, correlation id header."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, topic: str, event: BaseModel, tenant_id: str, client_id: str,
                      correlation_id: str | None = None) -> None:
        await self._producer.send_and_wait(
            topic, event.model_dump_json().encode(), key=ids.partition_key(tenant_id, client_id),
            headers=[("correlation_id", (correlation_id or str(uuid.uuid4())).encode()),
                     ("content-type", b"application/json")])

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self._producer.send_and_wait(topic, value, key=key)


def _scoring(tenant_id: str, client_id: str, sessions: list[Version], now: datetime) -> list[Output]:
    """What scoring publishes for these sessions of a new client, in order."""
    state = ClientState(tenant_id, client_id)
    outputs: list[Output] = []
    for v in sessions:
        step = state.submit(v, RULES, now)
        if step.rejection is not None:
            raise ValueError(f"scoring refused the session: {step.rejection.reason} {step.rejection.detail}")
        outputs.extend(step.outputs)
    return outputs


def deterioration(tenant_id: str, clinician_id: str, client_id: str, submission_id: str | None = None,
                  site_id: str = "site-a", accepted_at: datetime | None = None, episode_id: str | None = None,
                  session_number: int = 3) -> AllianceDeterioration:
    """The alert scoring raises (revision 1) when a client's total falls from 36.5 to 31.2 at
    `session_number` (below the cutoff and a drop: critical).

    Without `episode_id` every call is its own episode, hence its own alert: the alert id derives
    from the session (tenant, client, instrument, episode, session number).
    """
    sid = submission_id or uuid.uuid4().hex
    episode = episode_id or f"ep-{sid[:12]}"
    now = datetime.now(UTC)
    accepted = accepted_at or now
    falling = version_of(sid, Instrument.SRS, episode, session_number, now, site_id, clinician_id, None, 31.2,
                         accepted)
    before = version_of(f"{sid}-before", Instrument.SRS, episode, session_number - 1, now - timedelta(days=7),
                        site_id, clinician_id, None, 36.5, accepted)
    sessions = [before, falling] if session_number > 1 else [falling]
    [raised] = [o for o in _scoring(tenant_id, client_id, sessions, now) if isinstance(o, AlertOut)]
    return alert_event(tenant_id, client_id, raised)


def revised(alert: AllianceDeterioration, revision: int, **changes: Any) -> AllianceDeterioration:
    """Revision `revision` of an alert (what scoring publishes after a correction), with `changes`."""
    return alert.model_copy(update={"revision": revision, "event_id": ids.alert_event_id(alert.alert_id, revision),
                                    "occurred_at": datetime.now(UTC), **changes})


def ended(alert: AllianceDeterioration, status: str, revision: int | None = None) -> AlertStatusChanged:
    """Scoring's `superseded` / `withdrawn` of an alert, ending `revision` (default: the alert's)."""
    rev = alert.revision if revision is None else revision
    return AlertStatusChanged.model_validate({
        "event_id": ids.alert_status_event_id(alert.tenant_id, alert.alert_id, status, rev),
        "tenant_id": alert.tenant_id, "occurred_at": datetime.now(UTC), "alert_id": alert.alert_id,
        "site_id": alert.site_id, "clinician_id": alert.clinician_id, "status": status, "revision": rev,
        "client_id": alert.client_id, "instrument": alert.instrument, "episode_id": alert.episode_id,
        "session_number": alert.session_number})


def scored(tenant_id: str, clinician_id: str, client_id: str, submission_id: str | None = None,
           site_id: str = "site-a") -> SrsScored:
    """The scored event scoring publishes for a client's first session on record (number 2, total
    38.0: above the cutoff, no alert)."""
    sid = submission_id or uuid.uuid4().hex
    now = datetime.now(UTC)
    session = version_of(sid, Instrument.SRS, None, 2, now, site_id, clinician_id, None, 38.0, now)
    [out] = [o for o in _scoring(tenant_id, client_id, [session], now) if isinstance(o, ScoredOut)]
    return scored_event(tenant_id, client_id, out)
