"""Demo and test data: plausible scored-session streams as scoring would publish them.

Used by reporting's benchmark (tools/bench/reporting.py), the tests and the dashboard demo. The
flags, triggers and severity come from scoring's own rules (`services/scoring/rules.py`, default
tenant rules with the given cutoff), the ids from `shared/ids.py`, an acknowledgement from alerts'
own `status_changed`: nothing here re-derives what the services decide.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiokafka import AIOKafkaProducer

from services.alerts.rules import status_changed
from services.scoring.rules import (
    ITEM_BELOW_THRESHOLD,
    TenantRules,
    alert_decision,
    change_from_previous,
    low_items,
    score,
)
from shared.events import (
    AlertStatus,
    AlertStatusChanged,
    AllianceDeterioration,
    Flag,
    Instrument,
    Items,
    Severity,
    SrsScored,
    SubmissionIdentity,
)
from shared.ids import (
    alert_event_id,
    alert_id,
    alert_status_event_id,
    derive,
    derived_episode_id,
    partition_key,
    scored_event_id,
)
from shared.kafka import admin_security_kwargs
from shared.settings import KafkaSettings
from shared.topics import Topics

CUTOFF = 36.0
BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def derived_episode(first_administered: datetime, first_session: int = 1) -> str:
    """Scoring's id of a derived episode: `auto/<UTC date of its first session>/<its first number>`."""
    return derived_episode_id(first_administered, first_session)


def scored(tenant_id: str, client_id: str, session_number: int, total: float, *, site_id: str = "north",
           clinician_id: str = "c-1", instrument: Instrument = Instrument.SRS, episode_id: str | None = None,
           submission_id: str | None = None, items: Items | None = None, previous_total: float | None = None,
           accepted_at: datetime | None = None, scored_at: datetime | None = None, cutoff: float = CUTOFF,
           flags: list[str] | None = None, latest: bool = True, revision: int = 1, supersedes: str | None = None,
           site_version: int = 0, episode_derived: bool = False, administered_at: datetime | None = None,
           severity: Severity | None = None, previously_low_not_improving: bool = False) -> SrsScored:
    """One scored event; ids, times, flags, triggers and severity derived from the arguments unless given."""
    sid = submission_id or derive("demo-submission", tenant_id, client_id, str(instrument), episode_id or "",
                                  str(session_number))
    administered = administered_at or BASE + timedelta(days=7 * (session_number - 1))
    accepted = accepted_at or administered + timedelta(minutes=5)
    rules = TenantRules(cutoff=cutoff)
    if flags is None:
        decided = score(total, items, previous_total, latest, rules, previously_low_not_improving)
        total, change, flags = decided.total, decided.change_from_previous, list(decided.flags)
    else:
        change = change_from_previous(total, previous_total)
    low = list(low_items(items, rules.item_threshold))
    if low and ITEM_BELOW_THRESHOLD not in flags:
        flags = [*flags, ITEM_BELOW_THRESHOLD]
    # What an alert would carry were the session the latest (scoring shows it on every session).
    alert = alert_decision(flags, change, True, rules, previously_low_not_improving)
    triggers = list(alert.triggers) if alert is not None else []
    if severity is None and alert is not None:
        severity = alert.severity
    return SrsScored(
        event_id=scored_event_id(tenant_id, sid, revision), tenant_id=tenant_id, occurred_at=scored_at or accepted,
        submission_id=sid, site_id=site_id, clinician_id=clinician_id, client_id=client_id, episode_id=episode_id,
        instrument=instrument, session_number=session_number, administered_at=administered, items=items,
        total=total, cutoff=cutoff, previous_total=previous_total, change_from_previous=change, flags=flags,
        triggers=triggers, severity=severity if triggers else None, low_items=low, latest=latest,
        scored_at=scored_at or accepted + timedelta(seconds=1), accepted_at=accepted, revision=revision,
        supersedes=supersedes, episode_derived=episode_derived, site_version=site_version)


RESCORED = ("total", "items", "previous_total", "cutoff")


def revised(event: SrsScored, **changes: Any) -> SrsScored:
    """The next revision of a scored event, as scoring publishes it after a correction, a
    recomputation, a move or a transfer: `changes` (any argument of `scored`) applied, `revision`
    + 1 unless given, a later scoring time. Flags, triggers and severity are derived again when a
    scored value changes. Under a new `submission_id` it names the old one in `supersedes`
    (unless given)."""
    revision = int(changes.pop("revision", event.revision + 1))
    sid = str(changes.pop("submission_id", event.submission_id))
    supersedes = changes.pop("supersedes", event.submission_id if sid != event.submission_id else None)
    args: dict[str, Any] = dict(
        site_id=event.site_id, clinician_id=event.clinician_id, instrument=event.instrument,
        episode_id=event.episode_id, items=event.items, previous_total=event.previous_total,
        accepted_at=event.accepted_at, cutoff=event.cutoff, latest=event.latest, site_version=event.site_version,
        episode_derived=event.episode_derived, administered_at=event.administered_at,
        scored_at=event.scored_at + timedelta(minutes=revision))
    if not any(name in changes for name in RESCORED):
        args.update(flags=list(event.flags), severity=event.severity)
    args.update(changes)
    total = float(args.pop("total", event.total))
    number = int(args.pop("session_number", event.session_number))
    return scored(event.tenant_id, event.client_id, number, total, submission_id=sid, revision=revision,
                  supersedes=supersedes, **args)


def transferred(events: Iterable[SrsScored], site_id: str) -> list[SrsScored]:
    """What scoring re-publishes when a client moves to `site_id`: every current session with the
    new site, `revision` + 1 and `site_version` + 1."""
    return [revised(e, site_id=site_id, site_version=e.site_version + 1, supersedes=None) for e in events]


def items_for(total: float, rng: random.Random) -> Items:
    """Four items (one decimal, 0-10) that add up to `total`."""
    tenths = round(total * 10)
    parts = [0, 0, 0, 0]
    for _ in range(tenths):
        candidates = [i for i in range(4) if parts[i] < 100]
        parts[rng.choice(candidates)] += 1
    return Items(relationship=parts[0] / 10, goals=parts[1] / 10, approach=parts[2] / 10, overall=parts[3] / 10)


def deterioration_for(event: SrsScored) -> AllianceDeterioration | None:
    """The alert scoring would raise (or revise) for this session when it is the latest, if any."""
    if not event.triggers or not event.latest or event.severity is None:
        return None
    aid = alert_id(event.tenant_id, event.client_id, str(event.instrument), event.episode_id or "",
                   event.session_number)
    return AllianceDeterioration(
        event_id=alert_event_id(aid, event.revision), tenant_id=event.tenant_id,
        occurred_at=event.scored_at, alert_id=aid, submission_id=event.submission_id, site_id=event.site_id,
        clinician_id=event.clinician_id, client_id=event.client_id, episode_id=event.episode_id,
        instrument=event.instrument, session_number=event.session_number, administered_at=event.administered_at,
        triggers=list(event.triggers), severity=event.severity, total=event.total,
        previous_total=event.previous_total, change_from_previous=event.change_from_previous, cutoff=event.cutoff,
        accepted_at=event.accepted_at, revision=event.revision, low_items=list(event.low_items))


def lifecycle(alert: AllianceDeterioration, status: Literal[AlertStatus.SUPERSEDED, AlertStatus.WITHDRAWN],
              revision: int | None = None, at: datetime | None = None) -> AlertStatusChanged:
    """Scoring's `superseded` or `withdrawn` status of `alert` (ending `revision`, default the alert's)."""
    rev = revision or alert.revision
    return AlertStatusChanged(
        event_id=alert_status_event_id(alert.tenant_id, alert.alert_id, status, rev), tenant_id=alert.tenant_id,
        occurred_at=at or alert.occurred_at + timedelta(minutes=30), alert_id=alert.alert_id, site_id=alert.site_id,
        clinician_id=alert.clinician_id, status=status, revision=rev, client_id=alert.client_id,
        instrument=alert.instrument, episode_id=alert.episode_id, session_number=alert.session_number)


@dataclass(frozen=True)
class DemoSpec:
    """Shape of a demo caseload."""

    tenant_id: str = "demo"
    sites: tuple[str, ...] = ("north", "south")
    clinicians_per_site: int = 2
    clients_per_clinician: int = 6
    sessions: int = 8
    seed: int = 7


def client_stream(tenant_id: str, client_id: str, site_id: str, clinician_id: str, sessions: int,
                  rng: random.Random, instrument: Instrument = Instrument.SRS,
                  start: datetime = BASE) -> list[SrsScored]:
    """One episode of a client's sessions in order (weekly from `start`, derived episode id as
    scoring gives it): a random walk that sometimes falls below the cutoff."""
    style = rng.choice(("steady", "steady", "improving", "declining", "low"))
    level = {"steady": 38.0, "improving": 33.0, "declining": 39.0, "low": 33.5}[style]
    episode = derived_episode(start)
    out: list[SrsScored] = []
    previous: float | None = None
    was_low_not_improving = False
    for n in range(1, sessions + 1):
        drift = {"steady": 0.0, "improving": 0.8, "declining": -0.9, "low": 0.0}[style]
        level = min(40.0, max(12.0, level + drift + rng.uniform(-0.8, 0.8)))
        total = round(level, 1)
        event = scored(tenant_id, client_id, n, total, site_id=site_id, clinician_id=clinician_id,
                       instrument=instrument, items=items_for(total, rng), previous_total=previous, latest=True,
                       episode_id=episode, episode_derived=True, administered_at=start + timedelta(days=7 * (n - 1)),
                       previously_low_not_improving=was_low_not_improving)
        out.append(event)
        was_low_not_improving = Flag.LOW_NOT_IMPROVING in event.flags
        previous = total
    return out


def demo_events(spec: DemoSpec = DemoSpec()) -> Iterator[SrsScored | AllianceDeterioration | AlertStatusChanged]:
    """A whole demo tenant: scored events in session order, each followed by its alert if any (a
    later session supersedes the alert of the one before). Every third client had an earlier
    episode of care half a year before the current one."""
    rng = random.Random(spec.seed)
    instruments = (Instrument.SRS, Instrument.SRS, Instrument.SRS, Instrument.CSRS, Instrument.GSRS)
    for site in spec.sites:
        for c in range(spec.clinicians_per_site):
            clinician = f"{site}-c{c + 1}"
            for k in range(spec.clients_per_clinician):
                client = f"{site[0]}{c + 1}-{k + 1:03d}"
                instrument = instruments[k % len(instruments)]
                starts = [BASE - timedelta(days=182), BASE] if k % 3 == 1 else [BASE]
                for start in starts:
                    open_alert: AllianceDeterioration | None = None
                    for event in client_stream(spec.tenant_id, client, site, clinician,
                                               rng.randint(3, spec.sessions), rng, instrument, start):
                        yield event
                        if open_alert is not None:
                            yield lifecycle(open_alert, AlertStatus.SUPERSEDED, at=event.scored_at)
                            open_alert = None
                        alert = deterioration_for(event)
                        if alert is not None:
                            yield alert
                            open_alert = alert
                    if open_alert is not None and start != starts[-1]:
                        yield lifecycle(open_alert, AlertStatus.SUPERSEDED)


def topic_of(event: SrsScored | AllianceDeterioration | AlertStatusChanged, topics: Topics) -> str:
    """The topic an event travels on."""
    if isinstance(event, SrsScored):
        return topics.scored
    if isinstance(event, AllianceDeterioration):
        return topics.deterioration
    return topics.alert_status


async def publish(kafka: KafkaSettings, events: Iterable[SrsScored | AllianceDeterioration | AlertStatusChanged],
                  raw: Iterable[tuple[str, bytes, bytes | None]] = (), **producer_options: Any) -> int:
    """Publish events as scoring and alerts would (per-client key, correlation header), plus raw
    `(topic, value, key)` records; waits for every acknowledgement. Returns the count.
    `producer_options` override the producer's (a bulk load passes bigger batches and linger)."""
    options: dict[str, Any] = {"acks": "all", "linger_ms": 5, **producer_options}
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=kafka.idempotence,
                                **options, **admin_security_kwargs(kafka))
    await producer.start()
    try:
        topics = kafka.topics()
        futures = []
        for e in events:
            key: bytes = (partition_key(e.tenant_id, e.client_id) if isinstance(e, SubmissionIdentity)
                          else e.alert_id.encode())
            headers = [("correlation_id", derive("demo-correlation", e.event_id).encode()),
                       ("content-type", b"application/json")]
            futures.append(await producer.send(topic_of(e, topics), e.model_dump_json().encode(), key=key,
                                               headers=headers))
        for topic, value, raw_key in raw:
            futures.append(await producer.send(topic, value, key=raw_key))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def acknowledgement(alert: AllianceDeterioration, at: datetime | None = None) -> AlertStatusChanged:
    """The status event alerts publishes when a clinician acknowledges `alert` (alerts' own builder)."""
    return status_changed(alert.tenant_id, alert.alert_id, alert.site_id, alert.clinician_id, AlertStatus.ACKNOWLEDGED,
                          at or alert.occurred_at + timedelta(hours=2), alert.client_id)
