"""The scoring consumer: one batch of `srs.submitted.v1` and `ors.submitted.v1` records in,
scored/alert events out (the ORS family's on the ORS topics: docs/outcome.md).

Per batch (never per message):

1. the subscriber decodes every record (`shared.kafka.subscribe_batch(model=model_of)`: a client
   transfer named by the `record-type` header, on either submitted topic; on `srs.submitted.v1`
   a retraction named so too, else an SRS submission; on `ors.submitted.v1` else an ORS
   submission); undecodable or invalid ones become dead letters, published
   once the handler returned (the batch goes on);
2. read the state of every client in the batch - from this process's cache of the clients it
   wrote, the rest with ONE query - and the tenants' rules (cached for a few seconds); read the
   batch's submission ids in the tenant-wide index (`store.SubmissionIndex`, one query), which
   says, per id, which other clients hold a newer version (then a version is not taken) and
   which client was the first to hold it (for any other, its events' ids name the client):
   docs/clinical-records.md, "The same id for another client moves the session";
3. apply the records in order in memory (`series.ClientState`), one chunk of `save_chunk`
   clients at a time (a client's records all in one chunk, in the batch's order): each accepted
   record yields the events that tell the difference it made to the client's record; a refused
   one (site conflict, session gap, unscorable) a dead letter with the reason, remembered in the
   state so that a redelivery is refused alike; a record seen before re-emits what the record
   shows now;
4. write the chunk's changed clients with one bulk write, each guarded by the version it was
   read at - while the next chunk is applied (step 3), so that this process's CPU and the
   store's work at the same time; the store still gets one command after another;
5. register the versions the written chunk's clients hold of the batch's submission ids in the
   index (one bulk write; a client that learns there that another took the id first is written
   again, marked, before its events are built), then build and publish the chunk's scored events
   and alerts while the next chunk is written, with the dead letters of
   the refused records and a retraction (on `srs.submitted.v1`, keyed by the client that loses the
   id) for every client the index lists with an older version than the newest, and wait for every
   acknowledgement; once a chunk's records are acknowledged, remove from the index the former
   holders of an id beyond the newest few (`series.forgettable`: their retractions are durable in
   the broker now), so that an id re-sent for thousands of clients keeps one bounded document;
6. return: the shared subscriber then publishes the dead letters of the records that did not
   decode, and commits the offsets.

State is written BEFORE publishing (not after) so that an outcome exists in exactly one version
before anyone can see it. What a `kill -9` at each point leaves behind:

- during 1-2, or 3 of the first chunk: nothing was written or published; the batch is
  redelivered and scored afresh. (Later chunks' steps overlap - one chunk applied while another is
  written and a third published - so a crash leaves each chunk in one of the states below; every
  chunk is written before its events are built, so none is published ahead of its state.)
- during 4 (some documents or chunks written, some not): the written ones hold their records;
  the redelivered batch finds them as redeliveries, re-emits what those clients' records show
  (the same revisions, ids and bytes that were decided, none of which may have been published)
  and applies the rest.
- during or after 5, before the commit (the index registered or not, some or all events
  published): the state holds every decision; the redelivery registers again (a max: no
  change), re-publishes the clients' current events with the same ids and bytes (consumers dedupe
  by event id, and keep the highest revision) and the same retractions (a retraction applied
  again changes nothing but re-emitting the record). Nothing is lost: the offsets were not
  committed, so the records come back.
  A former holder is removed from the index only after its retraction was acknowledged, so a
  redelivery that no longer finds it there has nothing left to send it.
- after 6: nothing is redelivered.

A transient failure (store or broker down, acknowledgements late) raises out of the handler:
the shared subscriber retries the batch with backoff and never commits past it.

A transfer re-judges the refusals a client's record kept (`site_conflict` of an ORS-family form
read before the transfer, accepted at or after it, or between it and a later transfer read before
it: docs/clinical-records.md, "Site ownership").
In step 2 the index is also read for the submission ids of those refusals, and in step 3 the
transfer takes the ones its site owned at their acceptance into the record, as submitted
versions (judged against the index, so a newer version another client holds is not taken); the
timeline entry of the transfer names them. What a crash leaves behind:

- during 1-3: nothing; the refused ORS is still refused in the stored record, and the
  redelivered transfer re-judges it afresh.
- during 4: the client's document holds the transfer, the versions it took and their revisions,
  or none of it (one document, one write); the redelivery finds the transfer applied
  (`ClientState.transfers`) and re-emits what the record shows: the taken ORS's revision 1 and
  its alert at the revision decided, never a second revision nor a second alert.
- during 5, the index not registered: the redelivered transfer returns the versions its timeline
  entry names (`Step.taken`), which are registered like the batch's own submissions; registering
  again is a max, so no change when it was.
- the refused ORS record itself redelivered after the transfer took it (its batch's offsets
  were not committed): the record holds that very version, so it is a redelivery; its dead
  letter (sent when it was refused) is not sent again.

Two transfers of one client may be read in the reverse of their acceptance order (intake stamps
`accepted_at` before it publishes). The transfer read late is placed in the timeline at its
acceptance (`series.placed`), so the one accepted last decides the owner whatever the order; when
the owner does not change, it publishes nothing but the refusals it takes (and the dead letters
of those it refuses again, below), and writes its id and
timeline entry like any transfer, so what a crash leaves behind is as above: its redelivery is a
redelivery (re-emits the record, re-registers what its own entry names), its other copy an empty
step.

A kept refusal the transfer re-judges and refuses for another reason (a session gap, a duplicate,
a full record: `Step.refused`) is the record's refusal from then on, with `judgement` 1, and gets
a dead letter saying so (`rejudged_letter`, published in step 5 with the transfer's events; its
payload is the version's submitted event, rebuilt). The transfer's timeline entry keeps each such
refusal with its version and the time it was decided (`series.Handover.refused`), in the same
write. What a crash leaves behind:

- during 1-3: nothing; the transfer re-judges it afresh.
- during 4-5 (written, the dead letter not acknowledged): the redelivery of the copy that applied
  the transfer names the same refusals and publishes their dead letters again, byte-equal (the id
  derives from the client, the version and the judgement; the time is the re-judging's), so none
  is lost and none is sent with another outcome; the other copy publishes nothing, as for every
  transfer (the applying copy's redelivery makes it good).
- the refused ORS record itself redelivered after that: refused as the record says now (the new
  reason, `judgement` 1), under its own record's dead-letter id; reporting keeps, per submission
  and acceptance time, the highest judgement, so either letter read last changes nothing.

Intake writes each transfer twice, the same record on `srs.submitted.v1` and on
`ors.submitted.v1` (so each topic's partition holds it in order with the client's submissions of
that topic), and the two copies may be read in one batch or in any two, by one process or by two
(each topic's partition of the client may be owned by another). The copy read first applies the
transfer and the record notes which copy that was (`ClientState.outcome_copies`); the other copy
is an empty step: no write, no event, not even a redelivery's re-emission. That is enough because
the applying copy's offset is committed only after its events were acknowledged: until then it is
itself redelivered and re-emits the record. What a crash leaves behind:

- during 1-3 of the applying copy: nothing; whichever copy is read next applies the transfer.
- during 4-5 of the applying copy (written, the index or the events not): its redelivery re-emits
  the record and registers what the transfer took, as above; the other copy, read meanwhile or
  after, changes and publishes nothing.
- both copies applied concurrently by two processes (the client's two partitions owned by
  different processes): the version check in step 4 lets one write; the other reloads, finds the
  transfer applied by the other copy, and its copy is the empty step; the winner publishes.
- either copy redelivered at any later time: the other copy's is an empty step, the applying
  copy's a redelivery (re-emits byte-equal events); a transfer's id is remembered among the last
  32 transfers of the client (`MAX_TRANSFER_IDS`), as before.

Had we published first and written state after, a crash between the two would make the
redelivery score again with a new `scored_at` (and possibly changed tenant rules): two different
outputs for one input. Writing first closes that window.

Re-emitting what a record shows *now* (not what the redelivered input produced then) is enough
and never wrong: every event is a revision of a session or an alert, consumers keep the greatest
revision, and the current ones are the greatest. One thing the record's *now* does not show is
an alert's raise once the alert ended: when the batch that raised it also ended it and the crash
came before the broker acknowledged the raise, re-emitting only the end would leave an alert
nobody heard raised (a clinician told of the withdrawal of an alert never raised, reporting's
`alerts_raised` depending on when the crash came). So an ended alert re-emits its last raise too,
byte-equal, at the raise's own time (`ra`), then its end. Where that raise comes from:

- superseded (a later session of the client, as after a backlog): its session is still in its
  slot, so the raise is recomputed from the record (scored as the latest against the same
  previous session), and published only when its digest is what was raised. Only its time is kept.
- withdrawn (its session left its slot: regrouped into another episode, moved to another client
  by a retraction behind it in the partition, corrected into an unscored form; or a correction
  cleared its triggers): the record can no longer recompute it, so the withdrawn alert record
  keeps the raise itself (`rv`: the raised session's version and view, taken from what the record
  showed just before the withdrawing step, kept only when its digest is the record's). It is kept
  for every withdrawn alert, not only for one withdrawn in the batch that raised it: the series
  cannot tell whether a raise was acknowledged (a batch that crashed after raising it is
  redelivered, and the redelivery may bring the record that withdraws it too). Its size is
  bounded: one kept raise (some 700 bytes) per withdrawn alert, withdrawals are rare (moves,
  regroupings, corrections), and a record's alerts are bounded with its sessions
  (`max_client_submissions`). Forgetting it after the acknowledgement would take a write per
  batch, or a notion of batches in the pure series; neither is worth the bytes.

Not re-emitted (the end alone, as before): an alert ended in a record written before raise times
were kept (`ra`), one withdrawn in a record written before raises were kept (`rv`), and one whose
raise the record no longer shows alike (it was raised under tenant rules changed since: a raise
and its end in one batch are decided under the same rules).

Two scoring processes share the consumer group. The Kafka key is `tenant:client`, so one client
(its whole record) is in one partition, owned by one process at a time. During a rebalance the
old owner may still be mid-batch while the new owner re-reads the uncommitted records; the
version check in step 4 decides: whoever writes first wins, the other gets a conflict, reloads
that state (now holding the winner's decisions) and re-applies, which finds the records as
redeliveries and publishes the winner's events, byte-equal. Both may publish them (a duplicate,
same ids) but never two different ones.
The same check makes the state cache safe when a partition comes back after another process
wrote its series: scoring against the stale entry ends in a conflict, never in a publish.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from services.scoring import metrics
from services.scoring.outcome import advice
from services.scoring.rules import TenantRules
from services.scoring.series import (
    AlertOut,
    ClientState,
    Holding,
    OutcomeView,
    Output,
    Refusal,
    ScoredOut,
    SessionView,
    StatusOut,
    Step,
    Version,
    forgettable,
    holding,
    newer_elsewhere,
    record_key,
    retractions,
    version_of,
)
from services.scoring.store import ClientKey, Held, IndexKey, IndexPort, MemoryIndex, StatePort, client_key
from shared import ids
from shared.events import (
    CLIENT_TRANSFER,
    RECORD_TYPE_HEADER,
    RETRACTED_MOVED,
    SUBMISSION_RETRACTION,
    AgeBand,
    AlertStatusChanged,
    AllianceDeterioration,
    ClientTransfer,
    DeadLetter,
    Instrument,
    OrsScored,
    OrsSubmitted,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    OutcomeChange,
    OutcomeInstrument,
    SrsScored,
    SrsSubmitted,
    SubmissionRetraction,
)
from shared.kafka import CORRELATION_HEADER, Decoded, InboundRecord, OutboundRecord, dead_letter_record
from shared.metrics import DEADLETTER
from shared.topics import ORS_SUBMITTED, Topics

log = logging.getLogger("alliance.scoring")

SERVICE = "scoring"
Input = SrsSubmitted | OrsSubmitted | ClientTransfer | SubmissionRetraction
Submitted = SrsSubmitted | OrsSubmitted


class RulesPort(Protocol):
    """Where tenant rules come from."""

    async def get_many(self, tenants: Iterable[str]) -> dict[str, TenantRules]: ...


Publish = Callable[[Sequence[OutboundRecord]], Awaitable[None]]


class StateConflict(RuntimeError):
    """Another process kept writing the same client; the batch is retried by the subscriber."""


def model_of(rec: InboundRecord) -> (type[SrsSubmitted] | type[OrsSubmitted] | type[ClientTransfer]
                                     | type[SubmissionRetraction]):
    """The model a record holds: the `record-type` header tells a client transfer (on either
    submitted topic: intake publishes each on both) or, on `srs.submitted.v1`, a retraction
    (scoring's own, docs/clinical-records.md); any other `ors.submitted.v1` record (whatever the
    deployment's prefix) is an ORS submission, any other `srs.submitted.v1` record an SRS one."""
    kind = rec.headers.get(RECORD_TYPE_HEADER)
    if kind == CLIENT_TRANSFER:
        return ClientTransfer
    if on_outcome_topic(rec):
        return OrsSubmitted
    return SubmissionRetraction if kind == SUBMISSION_RETRACTION else SrsSubmitted


def on_outcome_topic(rec: InboundRecord) -> bool:
    """Whether the record was read on `ors.submitted.v1` (whatever the deployment's prefix)."""
    return rec.topic == ORS_SUBMITTED or rec.topic.endswith("." + ORS_SUBMITTED)


RETRACTION_HEADERS = {RECORD_TYPE_HEADER: SUBMISSION_RETRACTION}


def scale_of(instrument: str) -> str:
    """The scale of an instrument: "outcome" (ORS family) or "alliance" (SRS family)."""
    return "outcome" if is_outcome(instrument) else "alliance"


def index_key(ev: Submitted) -> IndexKey:
    """A submitted version's submission id in the tenant-wide index."""
    return IndexKey(ev.tenant_id, scale_of(ev.instrument), ev.submission_id)


def _index_key_of(tenant_id: str, v: Version) -> IndexKey:
    """A kept version's submission id in the tenant-wide index."""
    return IndexKey(tenant_id, scale_of(v.instrument), v.submission_id)


def rejudged_keys(inputs: Iterable[tuple[InboundRecord, Input]], states: dict[ClientKey, ClientState]) -> set[IndexKey]:
    """The submission ids of the refusals a transfer of the batch may re-judge (the kept
    `site_conflict` refusals of its client): read in the index with the batch's own, so that a
    version taken by a transfer is judged against other clients' as any submitted one."""
    out: set[IndexKey] = set()
    for _, ev in inputs:
        if isinstance(ev, ClientTransfer):
            st = states[client_key(ev.tenant_id, ev.client_id)]
            out |= {_index_key_of(ev.tenant_id, r.version) for r in st.rejected.values() if r.version is not None}
    return out


def _judged(held: dict[IndexKey, Held], tenant_id: str, client_id: str, v: Version) -> tuple[Holding | None, bool]:
    """What the index says of a version a transfer re-judges (`series.Judge`)."""
    h = held.get(_index_key_of(tenant_id, v), Held())
    return newer_elsewhere(h.held, client_id, v.accepted_at, v.digest), h.first in (None, client_id)


def retraction_event(k: IndexKey, client_id: str, as_of: Holding, now: datetime) -> SubmissionRetraction:
    """The retraction telling `client_id` that the submission `k` moved to `as_of`'s client."""
    at, digest, to_client = as_of
    return SubmissionRetraction(
        event_id=ids.submission_retraction_event_id(k.tenant_id, client_id, k.scale, k.submission_id, at, digest,
                                                    to_client),
        tenant_id=k.tenant_id, occurred_at=now, client_id=client_id, submission_id=k.submission_id, scale=k.scale,
        accepted_at=at, digest=digest, moved_to_client_id=to_client)


def _scored_id(tenant_id: str, client_id: str, o: ScoredOut, foreign: bool) -> str:
    """The event id of a scored revision: the client is part of it only for a client that was not
    the first to hold the submission (docs/clinical-records.md): every other id is what it was."""
    v = o.session.version
    if foreign:
        return ids.moved_scored_event_id(tenant_id, v.submission_id, o.revision, client_id, outcome=v.outcome)
    if v.outcome:
        return ids.ors_scored_event_id(tenant_id, v.submission_id, o.revision)
    return ids.scored_event_id(tenant_id, v.submission_id, o.revision)


def scored_event(tenant_id: str, client_id: str, o: ScoredOut, foreign: bool = False) -> SrsScored:
    """The `srs.scored.v1` event of one published revision; a pure function of its inputs.

    Built without validation (`model_construct`): every value comes from a validated submission or
    from the rules, and this is on the hot path (a tenth of a batch's apply time)."""
    s, v = o.session, o.session.version
    assert isinstance(s, SessionView), "an ORS-family session is published by ors_scored_event"
    return SrsScored.model_construct(
        event_id=_scored_id(tenant_id, client_id, o, foreign), tenant_id=tenant_id, occurred_at=o.at,
        submission_id=v.submission_id, site_id=s.site_id, clinician_id=v.clinician_id, client_id=client_id,
        episode_id=s.episode_id, instrument=Instrument(v.instrument), session_number=v.session_number,
        administered_at=v.administered_at, items=v.items_model(), total=s.total, cutoff=s.cutoff, operator=s.operator,
        schema_version=1,
        previous_total=s.previous_total, change_from_previous=s.change_from_previous, flags=list(s.flags),
        triggers=list(s.triggers), severity=s.severity, low_items=list(s.low_items), latest=o.latest,
        scored_at=o.at, accepted_at=v.accepted_at, revision=o.revision, supersedes=o.supersedes,
        episode_derived=s.episode_derived, site_version=s.site_version,
        retracted=RETRACTED_MOVED if o.retracted else None,
    )


def _raised_alert(tenant_id: str, client_id: str, o: AlertOut) -> dict[str, Any]:
    """What the events of a raised revision say alike, alliance and outcome alerts: the session the
    alert is about (at the site it was first raised for), the revision, and the totals it shows."""
    a, s, v = o.alert, o.alert.session, o.alert.session.version
    return {
        "event_id": ids.alert_event_id(a.alert_id, o.revision), "tenant_id": tenant_id, "occurred_at": o.at,
        "submission_id": v.submission_id, "site_id": a.site_id, "clinician_id": v.clinician_id,
        "client_id": client_id, "episode_id": s.episode_id, "session_number": v.session_number,
        "administered_at": v.administered_at, "alert_id": a.alert_id, "triggers": list(a.triggers),
        "total": s.total, "previous_total": s.previous_total, "change_from_previous": s.change_from_previous,
        "cutoff": s.cutoff, "accepted_at": v.accepted_at, "revision": o.revision,
    }


def alert_event(tenant_id: str, client_id: str, o: AlertOut) -> AllianceDeterioration:
    """The `alliance.deterioration.v1` event of one raised revision of an alert."""
    a, s, v = o.alert, o.alert.session, o.alert.session.version
    assert isinstance(s, SessionView), "an outcome alert is published by outcome_alert_event"
    return AllianceDeterioration(**_raised_alert(tenant_id, client_id, o), instrument=v.instrument,
                                 severity=a.shown_severity, low_items=list(s.low_items),
                                 outcome_at_risk=a.outcome_at_risk)


def ors_scored_event(tenant_id: str, client_id: str, o: ScoredOut, foreign: bool = False) -> OrsScored:
    """The `ors.scored.v1` event of one published revision of an ORS-family session."""
    s, v = o.session, o.session.version
    assert isinstance(s, OutcomeView), "an SRS-family session is published by scored_event"
    return OrsScored.model_construct(
        event_id=_scored_id(tenant_id, client_id, o, foreign), tenant_id=tenant_id,
        occurred_at=o.at, schema_version=1, submission_id=v.submission_id, site_id=s.site_id,
        clinician_id=v.clinician_id, client_id=client_id, episode_id=s.episode_id,
        instrument=OutcomeInstrument(v.instrument),
        session_number=v.session_number, administered_at=v.administered_at, client_age=v.client_age,
        items=v.ors_items_model(), total=s.total, age_band=AgeBand(s.band), cutoff=s.cutoff,
        reliable_change_index=s.reliable_change, intake_total=s.intake_total,
        change_from_intake=s.change_from_intake, previous_total=s.previous_total,
        change_from_previous=s.change_from_previous, change=None if s.change is None else OutcomeChange(s.change),
        clinically_significant_improvement=s.clinically_significant_improvement,
        in_clinical_range=s.in_clinical_range, flags=list(s.flags), triggers=list(s.triggers), severity=s.severity,
        latest=o.latest, scored_at=o.at, accepted_at=v.accepted_at, revision=o.revision, supersedes=o.supersedes,
        episode_derived=s.episode_derived, site_version=s.site_version,
        retracted=RETRACTED_MOVED if o.retracted else None,
    )


def outcome_alert_event(tenant_id: str, client_id: str, o: AlertOut) -> OutcomeAlert:
    """The `outcome.alert.v1` event of one raised revision of an outcome alert."""
    a, s, v = o.alert, o.alert.session, o.alert.session.version
    assert isinstance(s, OutcomeView), "an alliance alert is published by alert_event"
    return OutcomeAlert(**_raised_alert(tenant_id, client_id, o), instrument=OutcomeInstrument(v.instrument),
                        client_age=v.client_age, severity=a.severity, intake_total=s.intake_total,
                        change_from_intake=s.change_from_intake, advice=advice(a.triggers, a.severity))


def status_event(tenant_id: str, client_id: str, o: StatusOut) -> AlertStatusChanged:
    """The `alliance.alert-status.v1` event of an alert scoring superseded or withdrew (an outcome
    alert's: `OutcomeAlertStatusChanged`, for `outcome.alert-status.v1`)."""
    r = o.record
    if is_outcome(r.instrument):
        return OutcomeAlertStatusChanged(
            event_id=ids.alert_status_event_id(tenant_id, o.alert_id, o.status, r.revision), tenant_id=tenant_id,
            occurred_at=r.at, alert_id=o.alert_id, site_id=r.site_id, clinician_id=r.clinician_id, status=o.status,
            revision=r.revision, client_id=client_id, instrument=OutcomeInstrument(r.instrument),
            episode_id=r.episode_id, session_number=r.session_number,
        )
    return AlertStatusChanged(
        event_id=ids.alert_status_event_id(tenant_id, o.alert_id, o.status, r.revision), tenant_id=tenant_id,
        occurred_at=r.at, alert_id=o.alert_id, site_id=r.site_id, clinician_id=r.clinician_id, status=o.status,
        revision=r.revision, client_id=client_id, instrument=r.instrument, episode_id=r.episode_id,
        session_number=r.session_number,
    )


_OUTCOME_INSTRUMENTS = frozenset(i.value for i in OutcomeInstrument)


def is_outcome(instrument: str) -> bool:
    """An ORS-family instrument: its events go to the ORS topics."""
    return instrument in _OUTCOME_INSTRUMENTS


def version_from(ev: Submitted) -> Version:
    """The series' version of a submitted event (SRS or ORS family)."""
    age = ev.client_age if isinstance(ev, OrsSubmitted) else None
    return version_of(ev.submission_id, ev.instrument, ev.episode_id, ev.session_number, ev.administered_at,
                      ev.site_id, ev.clinician_id, ev.items, ev.total, ev.accepted_at, age)


def submitted_event(tenant_id: str, client_id: str, v: Version) -> Submitted:
    """The submitted event of a kept version as intake publishes it (its id derived from the
    submission, `occurred_at` its acceptance): the payload of a dead letter decided while another
    record was applied (`rejudged_letter`), which reporting reads like any refused submission."""
    common: dict[str, Any] = {
        "event_id": ids.submitted_event_id(tenant_id, v.submission_id), "tenant_id": tenant_id,
        "occurred_at": v.accepted_at, "submission_id": v.submission_id, "site_id": v.site_id,
        "clinician_id": v.clinician_id, "client_id": client_id, "episode_id": v.episode_id,
        "session_number": v.session_number, "administered_at": v.administered_at, "total": v.total,
        "accepted_at": v.accepted_at}
    if v.outcome:
        return OrsSubmitted(**common, instrument=OutcomeInstrument(v.instrument), client_age=v.client_age,
                            items=v.ors_items_model())
    return SrsSubmitted(**common, instrument=Instrument(v.instrument), items=v.items_model())


def rejudged_letter(tenant_id: str, client_id: str, r: Refusal, topics: Topics, corr: str,
                    traceparent: str | None = None) -> OutboundRecord:
    """The dead letter of a refusal a transfer's re-judging decided (`Step.refused`): byte-equal
    whenever it is built again (its id names the version and the judgement, its time is the
    re-judging's), its payload the version's submitted event on its submitted topic, so that it reads
    as the refused submission's dead letter; no source partition or offset (no record of its own)."""
    v, rej = r.version, r.rejection
    key = ids.partition_key(tenant_id, client_id)
    letter = DeadLetter(
        event_id=ids.rejudged_dead_letter_event_id(tenant_id, client_id, scale_of(v.instrument), v.submission_id,
                                                   v.accepted_at, v.digest, rej.judgement),
        tenant_id=tenant_id, occurred_at=r.at, service=SERVICE, reason=rej.reason, detail=rej.detail[:2000],
        source_topic=topics.ors_submitted if v.outcome else topics.submitted, key=key.decode(),
        payload=submitted_event(tenant_id, client_id, v).model_dump_json(),
        headers={CORRELATION_HEADER: v.submission_id}, judgement=rej.judgement)
    DEADLETTER.labels(SERVICE, rej.reason).inc()
    return OutboundRecord(topics.deadletter, letter.model_dump_json().encode(), key=key, correlation_id=corr,
                          traceparent=traceparent)


# Per submission id, the former holders the index may forget (client -> the version it lists).
ToForget = dict[IndexKey, dict[str, tuple[datetime, str]]]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Decided:
    """What one record made a client publish, turned into records once the index says which of the
    client's submissions it was not the first to hold (their event ids name the client)."""

    tenant_id: str
    client_id: str
    outputs: list[Output]
    corr: str
    traceparent: str | None


@dataclass
class _Pass:
    """The result of applying the batch's records to the state once."""

    outputs: dict[ClientKey, list[OutboundRecord | _Decided]] = field(default_factory=dict)  # incl. dead letters
    changed: set[ClientKey] = field(default_factory=set)
    # Per client, the submissions of the batch it was given a version of (index key, record key):
    # registered in the index once the client's state is written.
    touched: dict[ClientKey, set[tuple[IndexKey, str]]] = field(default_factory=dict)
    # The clients whose whole record a redelivery re-emitted (once per client and pass).
    reemitted: set[ClientKey] = field(default_factory=set)


def in_acceptance_order(pairs: list[tuple[InboundRecord, Input]]) -> list[tuple[InboundRecord, Input]]:
    """A batch's records with each partition's kept in its order, the partitions interleaved in
    the order intake accepted their records. A batch holds several partitions' records one
    partition after another (an ORS topic's before an SRS topic's), and the decisions taken at
    arrival (the client's site from its first accepted session, a session gap) must follow
    acceptance, not that layout. One partition's order is never changed: a redelivery of it in
    batches cut elsewhere must decide the same (see the module docs). `timestamp()`, so that no
    mix of naive and aware times can make a comparison raise and stall the partition."""
    parts: dict[tuple[str, int], list[tuple[InboundRecord, Input]]] = {}
    for pair in pairs:
        parts.setdefault((pair[0].topic, pair[0].partition), []).append(pair)
    if len(parts) < 2:
        return pairs
    return list(heapq.merge(*parts.values(), key=lambda pair: pair[1].accepted_at.timestamp()))


# What a chunk's store work returns (`ScoringHandler._store`): the clients another writer got to
# first, the clients whose state is stored, and what the index holds after registering them.
_Stored = tuple[set[ClientKey], list[ClientKey], dict[IndexKey, Held]]

# Records applied between two yields to the event loop: a slice takes a few ms of CPU, so the
# previous chunk's write, the consumer's fetches and the HTTP endpoints wait no longer than that.
APPLY_SLICE = 32


@dataclass
class ScoringHandler:
    """The batch handler given to `shared.kafka.subscribe_batch`.

    The batch is applied and written in chunks of clients (module docs, steps 3-5): a chunk is
    applied while the one before it is written, and its events are built and published while the
    one after it is written. The store, the broker and this process work at the same time, and no
    event is ever published before its state.
    """

    states: StatePort
    rules: RulesPort
    publish: Publish
    topics: Topics
    clock: Callable[[], datetime] = _now
    conflict_attempts: int = 5
    save_chunk: int = 128
    # Which clients hold which submission ids, tenant-wide (docs/clinical-records.md); the app
    # passes the store's, a handler on its own keeps one in memory.
    index: IndexPort = field(default_factory=MemoryIndex)

    async def __call__(self, decoded: list[Decoded[Input]]) -> None:
        started = time.perf_counter()
        inputs = in_acceptance_order([(d.record, d.event) for d in decoded])
        sending: list[asyncio.Task[None]] = []
        try:
            if inputs:
                await self._apply_all(inputs, sending)
            await asyncio.gather(*sending)
        finally:
            for task in sending:  # after a failure, let no send outlive the batch attempt
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _send(self, records: list[OutboundRecord], forget: ToForget) -> None:
        with metrics.PHASE_SECONDS.labels("publish").time():
            await self.publish(records)
        # Only now that their retractions are acknowledged may the index stop listing these
        # clients: a crash before would redeliver the batch, and its registration must still find
        # them to send the retractions again (series.forgettable).
        if forget:
            with metrics.PHASE_SECONDS.labels("index").time():
                await self.index.forget(forget)
            log.warning("submission index: forgot %d former holders of %d submission ids (one id re-sent for "
                        "many clients)", sum(map(len, forget.values())), len(forget))

    async def _apply_all(self, inputs: list[tuple[InboundRecord, Input]], sending: list[asyncio.Task[None]]) -> None:
        """Apply, write state, and start publishing each client's events (and the dead letters of
        its refused records) once its state is written.

        The batch is applied one chunk of `save_chunk` clients at a time: a chunk is applied while
        the previous one is written and registered (`_store`, one task at a time, so the store
        still gets one command after another), and the previous one's records are built while
        it is written. This process's CPU and the store's then work at the same time instead of
        in turn. A client's records are all in one chunk, in the batch's order, and a chunk's pass
        reads only what was read for the batch (states, rules, the index) and its own clients'
        states, so applying by chunks decides exactly what applying the whole batch at once would."""
        remaining = inputs
        for _attempt in range(self.conflict_attempts):
            keys = {client_key(ev.tenant_id, ev.client_id) for _, ev in remaining}
            with metrics.PHASE_SECONDS.labels("load").time():
                states = await self.states.load(keys)
                rules = await self.rules.get_many({ev.tenant_id for _, ev in remaining})
                held = await self.index.read({index_key(ev) for _, ev in remaining
                                              if isinstance(ev, SrsSubmitted | OrsSubmitted)}
                                             | rejudged_keys(remaining, states))
            conflicts: set[ClientKey] = set()
            # The chunk being written: its store task and its pass.
            writing: tuple[asyncio.Task[_Stored], _Pass] | None = None
            try:
                for chunk in self._chunks(remaining):
                    p = _Pass()
                    for i in range(0, len(chunk), APPLY_SLICE):
                        with metrics.PHASE_SECONDS.labels("apply").time():
                            self._apply(chunk[i : i + APPLY_SLICE], states, rules, held, p)
                        # Let the previous chunk's store work go on (send its command, read its
                        # reply, register) between slices: a task only runs when this one yields.
                        await asyncio.sleep(0)
                    done = None
                    if writing is not None:
                        lost, stored, after = await writing[0]
                        conflicts |= lost
                        done = (writing[1], stored, after)
                    writing = (asyncio.create_task(self._store(p, states, held)), p)
                    await asyncio.sleep(0)  # the write starts (its command is sent) before anything else runs
                    if done is not None:  # the previous chunk's records are built while this chunk is written
                        self._publish(*done, states, sending)
                if writing is not None:
                    lost, stored, after = await writing[0]
                    conflicts |= lost
                    self._publish(writing[1], stored, after, states, sending)
            finally:
                if writing is not None and not writing[0].done():  # a failure above: no write outlives it
                    writing[0].cancel()
                    await asyncio.gather(writing[0], return_exceptions=True)
            if not conflicts:
                return
            # Another process wrote these clients since we read them (a partition moved): read
            # them again; its decisions are now in the state and are what we publish.
            metrics.STATE_CONFLICTS.inc(len(conflicts))
            log.warning("state conflict on %d clients; re-reading", len(conflicts))
            remaining = [(rec, ev) for rec, ev in remaining if client_key(ev.tenant_id, ev.client_id) in conflicts]
        raise StateConflict(f"state kept changing under us after {self.conflict_attempts} attempts")

    def _chunks(self, inputs: list[tuple[InboundRecord, Input]]) -> list[list[tuple[InboundRecord, Input]]]:
        """The records of `save_chunk` clients each (clients in `_id` order, so that two processes
        writing the same clients take them in the same order), each client's in the batch's order."""
        order = sorted({client_key(ev.tenant_id, ev.client_id) for _, ev in inputs}, key=lambda k: k.doc_id)
        if len(order) <= self.save_chunk:
            return [inputs]
        chunks: list[list[tuple[InboundRecord, Input]]] = []
        for i in range(0, len(order), self.save_chunk):
            mine = set(order[i : i + self.save_chunk])
            chunks.append([pair for pair in inputs if client_key(pair[1].tenant_id, pair[1].client_id) in mine])
        return chunks

    async def _store(self, p: _Pass, states: dict[ClientKey, ClientState], held: dict[IndexKey, Held]) -> _Stored:
        """The store's part of one chunk's pass: write its changed clients (one bulk write), then
        register the versions of every client of it whose state is stored (the written ones and
        those whose record did not change, stored before). Returns the clients another writer got
        to first (nothing of theirs is published), the stored ones, and what the index holds."""
        dirty = {k: states[k] for k in sorted(p.changed, key=lambda k: k.doc_id)}
        lost: set[ClientKey] = set()
        if dirty:
            # Timed from the command's start to when this task resumes: it includes the wait for
            # the loop while the next chunk is being applied.
            with metrics.PHASE_SECONDS.labels("save").time():
                lost = await self.states.save(dirty)
            metrics.STATE_WRITES.inc(len(dirty) - len(lost))
        keys = [k for k in p.outputs if k not in lost]
        return lost, keys, await self._register(keys, p, states, held)

    def _publish(self, p: _Pass, keys: list[ClientKey], held: dict[IndexKey, Held],
                 states: dict[ClientKey, ClientState], sending: list[asyncio.Task[None]]) -> None:
        """Start publishing the records of a chunk's stored clients."""
        outputs, forget = self._outbound(keys, p, states, held)
        if outputs:
            sending.append(asyncio.create_task(self._send(outputs, forget)))

    async def _register(self, keys: list[ClientKey], p: _Pass, states: dict[ClientKey, ClientState],
                        seen: dict[IndexKey, Held]) -> dict[IndexKey, Held]:
        """Register in the index the versions that clients whose state is written hold of the
        batch's submissions; returns what the index holds of those ids after."""
        versions: dict[tuple[IndexKey, str], tuple[datetime, str]] = {}
        rkeys: dict[tuple[IndexKey, str], str] = {}
        for k in keys:
            for ik, rkey in p.touched.get(k, ()):
                order = states[k].newest(rkey)
                if order is not None:
                    versions[(ik, k.client_id)] = order
                    rkeys[(ik, k.client_id)] = rkey
        with metrics.PHASE_SECONDS.labels("index").time():
            held = await self.index.register(versions, seen) if versions else {}
        # A client that took an id another took first at the same moment (neither saw the other
        # when the batch was read) learns it only now: its events' ids must name it, so its record
        # says so before they are published (its events are not built yet).
        late = {client_key(ik.tenant_id, c) for (ik, c), rkey in rkeys.items()
                if held[ik].first not in (None, c) and states[client_key(ik.tenant_id, c)].mark_foreign(rkey)}
        if late:
            if await self.states.save({k: states[k] for k in late}):
                raise StateConflict("another process wrote a client while its foreign ids were being recorded")
        return held

    def _outbound(self, keys: list[ClientKey], p: _Pass, states: dict[ClientKey, ClientState],
                  held: dict[IndexKey, Held]) -> tuple[list[OutboundRecord], ToForget]:
        """The records of clients whose state is written and whose versions are registered: their
        events (ids by what the index says) and a retraction for every client the index lists with
        an older version of one. Also the former holders the index may forget once those records
        are published (per key, client -> the version it lists)."""
        now = self.clock()
        out: list[OutboundRecord] = []
        for k in keys:
            foreign = states[k].foreign
            for item in p.outputs.get(k, ()):
                if isinstance(item, _Decided):
                    out.extend(self._records(item.tenant_id, item.client_id, item.outputs, item.corr,
                                             item.traceparent, foreign))
                else:
                    out.append(item)
        forget: ToForget = {}
        for ik, h in sorted(held.items(), key=lambda kh: kh[0].doc_id):
            for client_id, as_of in retractions(h.held):
                ev = retraction_event(ik, client_id, as_of, now)
                out.append(OutboundRecord(self.topics.submitted, ev.model_dump_json().encode(),
                                          key=ids.partition_key(ik.tenant_id, client_id),
                                          correlation_id=ik.submission_id, headers=dict(RETRACTION_HEADERS)))
            if gone := forgettable(h.held):
                forget[ik] = {c: h.held[c] for c in gone}
        return out, forget

    def _apply(self, inputs: list[tuple[InboundRecord, Input]], states: dict[ClientKey, ClientState],
               rules: dict[str, TenantRules], held: dict[IndexKey, Held], p: _Pass) -> None:
        """Apply `inputs` in order, adding what they decide to `p`."""
        reemitted = p.reemitted
        for rec, ev in inputs:
            key = client_key(ev.tenant_id, ev.client_id)
            st = states[key]
            tenant_rules = rules[ev.tenant_id]
            now = self.clock()
            step: Step
            if isinstance(ev, ClientTransfer):
                step = st.transfer(ev.event_id, ev.site_id, tenant_rules, now, ev.accepted_at,
                                   partial(_judged, held, ev.tenant_id, ev.client_id), on_outcome_topic(rec))
                for v in step.taken:  # refusals the transfer re-judged and took: registered as submitted
                    p.touched.setdefault(key, set()).add((_index_key_of(ev.tenant_id, v), v.key))
            elif isinstance(ev, SubmissionRetraction):
                rkey = record_key(ev.submission_id, "ORS" if ev.scale == "outcome" else "SRS")
                step = st.retract(rkey, holding(ev.accepted_at, ev.digest, ev.moved_to_client_id), tenant_rules, now)
            else:
                v = version_from(ev)
                ik = index_key(ev)
                h = held.get(ik, Held())
                step = st.submit(v, tenant_rules, now, newer_elsewhere(h.held, ev.client_id, v.accepted_at, v.digest),
                                 first=h.first in (None, ev.client_id))
                p.touched.setdefault(key, set()).add((ik, v.key))
            if step.changed:
                p.changed.add(key)
            outputs: list[Output] = step.outputs
            if step.redelivered:
                metrics.REEMITTED.inc()
                if key not in reemitted:  # once per client and batch: it is the whole record
                    reemitted.add(key)
                    outputs = st.current_outputs(tenant_rules)
            corr = rec.headers.get(CORRELATION_HEADER) or getattr(ev, "submission_id", None) or ev.event_id
            mine = p.outputs.setdefault(key, [])
            if outputs:
                mine.append(_Decided(ev.tenant_id, ev.client_id, list(outputs), corr, rec.traceparent))
            if step.rejection is not None:
                mine.append(dead_letter_record(SERVICE, rec, step.rejection.reason, step.rejection.detail,
                                               self.topics.deadletter, ev.tenant_id, step.rejection.judgement))
            # A transfer's re-judging refused a kept site_conflict for another reason (its redelivery
            # names them again): the submitter hears the new reason, under the same id each time.
            mine.extend(rejudged_letter(ev.tenant_id, ev.client_id, r, self.topics, corr, rec.traceparent)
                        for r in step.refused)
            self._count(ev, step, now)

    def _records(self, tenant_id: str, client_id: str, outputs: Iterable[Output], corr: str,
                 traceparent: str | None, foreign: set[str]) -> list[OutboundRecord]:
        pkey = ids.partition_key(tenant_id, client_id)
        out: list[OutboundRecord] = []
        t = self.topics
        for o in outputs:
            if isinstance(o, ScoredOut):
                moved = o.session.version.key in foreign
                if isinstance(o.session, OutcomeView):
                    topic, body = t.ors_scored, ors_scored_event(tenant_id, client_id, o, moved).model_dump_json()
                else:
                    topic, body = t.scored, scored_event(tenant_id, client_id, o, moved).model_dump_json()
            elif isinstance(o, AlertOut):
                if isinstance(o.alert.session, OutcomeView):
                    topic, body = t.outcome_alert, outcome_alert_event(tenant_id, client_id, o).model_dump_json()
                else:
                    topic, body = t.deterioration, alert_event(tenant_id, client_id, o).model_dump_json()
            elif is_outcome(o.record.instrument):
                topic, body = t.outcome_alert_status, status_event(tenant_id, client_id, o).model_dump_json()
            else:
                topic, body = t.alert_status, status_event(tenant_id, client_id, o).model_dump_json()
            out.append(OutboundRecord(topic, body.encode(), key=pkey, correlation_id=corr, traceparent=traceparent))
        return out

    @staticmethod
    def _count(ev: Input, step: Step, now: datetime) -> None:
        if isinstance(ev, ClientTransfer | SubmissionRetraction) or step.redelivered or not step.changed:
            return
        if step.audited:
            metrics.AUDITED.labels(ev.instrument.value).inc()
            return
        if step.rejection is not None and step.rejection.reason != "duplicate":
            return
        metrics.SCORED.labels(ev.instrument.value).inc()
        metrics.SUBMISSION_TO_SCORED.observe(max(0.0, (now - ev.accepted_at).total_seconds()))
        for o in step.outputs:
            if isinstance(o, AlertOut) and o.revision == 1:
                for trigger in o.alert.triggers:
                    metrics.DETERIORATION.labels(trigger, o.alert.shown_severity).inc()
            elif isinstance(o, StatusOut):
                metrics.ALERT_STATUS.labels(o.status).inc()

