"""ORS-family events for reporting's tests, built with the real contract models (shared.events).

The scored values follow docs/outcome.md (adult cutoff 25, reliable change index 5 from the
episode's first session) so that a series reads like scoring's; reporting never recomputes them,
so the tests only need them consistent. `outcome_series` gives one episode's sessions in order.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from shared.events import (
    AgeBand,
    AlertStatus,
    OrsItems,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    OutcomeChange,
    OutcomeFlag,
    OutcomeInstrument,
    Severity,
)
from shared.ids import alert_event_id, alert_id, derive, partition_key
from shared.settings import KafkaSettings
from tools.demo import BASE, publish

ADULT_CUTOFF = 25.0
RCI = 5.0


def ors_scored(tenant_id: str, client_id: str, session_number: int, total: float, *, intake_total: float | None,
               previous_total: float | None = None, site_id: str = "north", clinician_id: str = "c-1",
               episode_id: str | None = "ep-1", instrument: OutcomeInstrument = OutcomeInstrument.ORS,
               items: OrsItems | None = None, revision: int = 1, submission_id: str | None = None,
               supersedes: str | None = None, administered_at: datetime | None = None,
               site_version: int = 0, not_on_track: bool = False) -> OrsScored:
    """One scored ORS session as scoring publishes it (`intake_total` None: this is the intake)."""
    sid = submission_id or derive("test-ors", tenant_id, client_id, str(instrument), episode_id or "",
                                  str(session_number))
    administered = administered_at or BASE + timedelta(days=7 * (session_number - 1), minutes=-50)
    intake = total if intake_total is None else intake_total
    change_from_intake = round(total - intake, 1)
    if change_from_intake >= RCI:
        change = OutcomeChange.RELIABLE_IMPROVEMENT
    elif change_from_intake <= -RCI:
        change = OutcomeChange.RELIABLE_DETERIORATION
    else:
        change = OutcomeChange.NO_RELIABLE_CHANGE
    in_range = total < ADULT_CUTOFF
    significant = change == OutcomeChange.RELIABLE_IMPROVEMENT and intake < ADULT_CUTOFF <= total
    flags = [OutcomeFlag.IN_CLINICAL_RANGE.value] if in_range else []
    flags.append(change.value)
    if significant:
        flags.append(OutcomeFlag.CLINICALLY_SIGNIFICANT_IMPROVEMENT.value)
    triggers = []
    if change == OutcomeChange.RELIABLE_DETERIORATION:
        triggers.append(OutcomeFlag.RELIABLE_DETERIORATION.value)
    if not_on_track:
        flags.append(OutcomeFlag.NOT_ON_TRACK.value)
        triggers.append(OutcomeFlag.NOT_ON_TRACK.value)
    severity = (Severity.CRITICAL if OutcomeFlag.RELIABLE_DETERIORATION.value in triggers
                else Severity.WARNING if triggers else None)
    scored_at = administered + timedelta(minutes=1, seconds=revision)
    return OrsScored(
        event_id=derive("test-ors-event", tenant_id, sid, str(revision)), tenant_id=tenant_id,
        occurred_at=scored_at, submission_id=sid, site_id=site_id, clinician_id=clinician_id, client_id=client_id,
        episode_id=episode_id, instrument=instrument, session_number=session_number, administered_at=administered,
        items=items, total=total, age_band=AgeBand.ADULT, cutoff=ADULT_CUTOFF, reliable_change_index=RCI,
        intake_total=intake, change_from_intake=change_from_intake, previous_total=previous_total,
        change_from_previous=None if previous_total is None else round(total - previous_total, 1), change=change,
        clinically_significant_improvement=significant, in_clinical_range=in_range, flags=flags, triggers=triggers,
        severity=severity, scored_at=scored_at, accepted_at=administered + timedelta(seconds=30), revision=revision,
        supersedes=supersedes, site_version=site_version)


def outcome_series(tenant_id: str, client_id: str, totals: list[float], **kw: Any) -> list[OrsScored]:
    """One episode's sessions 1..n with these totals (the first is the intake)."""
    out: list[OrsScored] = []
    for n, total in enumerate(totals, start=1):
        out.append(ors_scored(tenant_id, client_id, n, total, intake_total=totals[0] if n > 1 else None,
                              previous_total=totals[n - 2] if n > 1 else None, **kw))
    return out


def outcome_alert_for(event: OrsScored) -> OutcomeAlert:
    """The outcome alert scoring raises for this session (it must have triggers)."""
    assert event.triggers and event.severity is not None
    aid = alert_id(event.tenant_id, event.client_id, str(event.instrument), event.episode_id or "",
                   event.session_number)
    return OutcomeAlert(
        event_id=alert_event_id(aid, event.revision), tenant_id=event.tenant_id, occurred_at=event.scored_at,
        alert_id=aid, submission_id=event.submission_id, site_id=event.site_id, clinician_id=event.clinician_id,
        client_id=event.client_id, episode_id=event.episode_id, instrument=event.instrument,
        session_number=event.session_number, administered_at=event.administered_at, triggers=list(event.triggers),
        severity=event.severity, total=event.total, cutoff=event.cutoff, intake_total=event.intake_total,
        change_from_intake=event.change_from_intake, previous_total=event.previous_total,
        change_from_previous=event.change_from_previous,
        advice="discuss with the client how they are doing; consider changing the approach or a referral",
        accepted_at=event.accepted_at, revision=event.revision)


def outcome_status(alert: OutcomeAlert, status: AlertStatus, revision: int | None = None) -> OutcomeAlertStatusChanged:
    """A status of an outcome alert (`acknowledged` from alerts; `superseded`/`withdrawn` from scoring)."""
    return OutcomeAlertStatusChanged(
        event_id=derive("test-outcome-status", alert.alert_id, str(status), str(revision or alert.revision)),
        tenant_id=alert.tenant_id, occurred_at=alert.occurred_at + timedelta(minutes=3), alert_id=alert.alert_id,
        site_id=alert.site_id, clinician_id=alert.clinician_id, status=status,
        revision=(revision or alert.revision) if status in (AlertStatus.SUPERSEDED, AlertStatus.WITHDRAWN) else None,
        client_id=alert.client_id, instrument=alert.instrument, episode_id=alert.episode_id,
        session_number=alert.session_number)


OutcomeEvent = OrsScored | OutcomeAlert | OutcomeAlertStatusChanged


async def publish_outcome(kafka: KafkaSettings, events: Iterable[OutcomeEvent]) -> int:
    """Publish ORS-family events on their topics as scoring and alerts do (keyed `tenant:client`)."""
    topics = kafka.topics()
    raw: list[tuple[str, bytes, bytes | None]] = []
    for e in events:
        topic = (topics.ors_scored if isinstance(e, OrsScored) else topics.outcome_alert
                 if isinstance(e, OutcomeAlert) else topics.outcome_alert_status)
        raw.append((topic, e.model_dump_json().encode(), partition_key(e.tenant_id, e.client_id or "")))
    return await publish(kafka, [], raw)
