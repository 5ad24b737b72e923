"""Deterministic identities: a redelivery of the same input always yields the same ids.

Every id the system derives is made here, so that its recipe is written once: ids are stored and
published, and a recipe that changed (a part, its order, the namespace) would break idempotency.
tests/unit/test_ids.py pins the value of each.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime

# A fixed namespace for every id this system derives; changing it would break idempotency.
NAMESPACE = uuid.UUID("5b7f3a52-6f0e-4e37-9a43-2c1f1f6f9a10")


def derive(*parts: str) -> str:
    """A UUIDv5 over the given parts, joined unambiguously."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def scored_event_id(tenant_id: str, submission_id: str, revision: int = 1) -> str:
    """Event id of one revision of the scored event of a submission (revision 1 keeps the id
    earlier versions of this system gave)."""
    if revision == 1:
        return derive("scored", tenant_id, submission_id)
    return derive("scored", tenant_id, submission_id, str(revision))


def moved_scored_event_id(tenant_id: str, submission_id: str, revision: int, client_id: str,
                          outcome: bool = False) -> str:
    """Event id of one revision of the scored event of a submission held by a client that was not
    the first to hold it (the session moved there, docs/clinical-records.md): the client is part
    of the id, so two clients' events of one submission never share one. The first client's events
    keep `scored_event_id` / `ors_scored_event_id`."""
    return derive("ors-scored" if outcome else "scored", tenant_id, submission_id, str(revision), "client", client_id)


def submission_retraction_event_id(tenant_id: str, client_id: str, scale: str, submission_id: str,
                                   accepted_at: datetime, digest: str, moved_to: str) -> str:
    """Event id of a retraction: one per (client losing it, submission, newest version)."""
    return derive("submission-retraction", tenant_id, client_id, scale, submission_id,
                  accepted_at.astimezone(UTC).isoformat(), digest, moved_to)


def rejudged_dead_letter_event_id(tenant_id: str, client_id: str, scale: str, submission_id: str,
                                  accepted_at: datetime, digest: str, judgement: int) -> str:
    """Event id of the dead letter of a refusal a transfer re-judged: one per (client, submitted
    version, judgement), whichever copy of the transfer applied it and however often it is redelivered."""
    return derive("rejudged-dead-letter", tenant_id, client_id, scale, submission_id,
                  accepted_at.astimezone(UTC).isoformat(), digest, str(judgement))


def submission_index_id(tenant_id: str, scale: str, submission_id: str) -> str:
    """Scoring's key of a submission in its tenant-wide index (which clients hold versions of it)."""
    return store_key(tenant_id, scale, submission_id)


def ors_scored_event_id(tenant_id: str, submission_id: str, revision: int) -> str:
    """Event id of one revision of the scored event of an outcome (ORS-family) submission: apart
    from `scored_event_id`, because a submission id names one submission per scale, and the SRS and
    the ORS of one session may carry the same id (docs/clinical-records.md, "Session identity")."""
    return derive("ors-scored", tenant_id, submission_id, str(revision))


def alert_id(tenant_id: str, client_id: str, instrument: str, episode_id: str, session_number: int) -> str:
    """Alert id of a session: one alert per session, stable across corrections."""
    return derive("alert", tenant_id, client_id, str(instrument), episode_id, str(session_number))


def alert_event_id(alert_id_: str, revision: int) -> str:
    """Event id of one revision of an alert on `alliance.deterioration.v1` (revision 1: the alert id)."""
    return alert_id_ if revision == 1 else derive("alert-revision", alert_id_, str(revision))


def alert_status_event_id(tenant_id: str, alert_id_: str, status: str, revision: int | None = None,
                          channel: str | None = None) -> str:
    """Event id of an alert status change: one per alert and status; and revision for scoring's
    and for alerts' `delivered`; and revision and channel for alerts' `failed` (one per clinician
    delivery that used up its attempts)."""
    if revision is None:
        if channel is not None:
            raise ValueError("a status id names a channel only with a revision")
        return derive("alert-status", tenant_id, alert_id_, status)
    if channel is None:
        return derive("alert-status", tenant_id, alert_id_, status, str(revision))
    return derive("alert-status", tenant_id, alert_id_, status, str(revision), channel)


def client_transfer_event_id(tenant_id: str, client_id: str, site_id: str, request_id: str) -> str:
    """Event id of a client transfer request."""
    return derive("client-transfer", tenant_id, client_id, site_id, request_id)


def delivery_id(alert_or_event_id: str, recipient: str, channel: str) -> str:
    """Delivery id of one notification; receivers see it on every retry."""
    return derive("delivery", alert_or_event_id, recipient, channel)


def submitted_event_id(tenant_id: str, submission_id: str) -> str:
    """Event id of the submitted event of one submission."""
    return derive("submitted", tenant_id, submission_id)


DERIVED_EPISODE_PREFIX = "auto/"


def derived_episode_id(first_administered_at: datetime, first_session_number: int) -> str:
    """Scoring's id of an episode the submitter did not name: `auto/<UTC date of its first
    session>/<that session's number>` (published in `SrsScored.episode_id`; see the contract).
    Scoring passes the time of the first session as first accepted (`series.Version.named_at`):
    a corrected time of that session does not rename the episode."""
    return f"{DERIVED_EPISODE_PREFIX}{first_administered_at.astimezone(UTC).date().isoformat()}/{first_session_number}"


def _derived_episode_parts(episode_id: str) -> tuple[date, str] | None:
    """The date and first session number a derived episode id names; None for a submitter's id."""
    if not episode_id.startswith(DERIVED_EPISODE_PREFIX):
        return None
    day, _, number = episode_id.removeprefix(DERIVED_EPISODE_PREFIX).partition("/")
    try:
        return date.fromisoformat(day), number
    except ValueError:
        return None


def same_episode_of_both_scales(alliance_episode: str, outcome_episode: str) -> bool:
    """Whether an alliance instrument's episode and its paired outcome instrument's are one episode
    of care (the ORS and the SRS of one session share it; see docs/outcome.md): the same id, or
    two derived ids that begin with the same session number on UTC dates at most a day apart.

    Each scale's episodes are derived from its own sessions, and the ORS is given at a session's
    start, the SRS at its end: a session across midnight UTC (an evening session in the Americas)
    puts its two first forms on two UTC dates, so the two derived ids name different dates."""
    if alliance_episode == outcome_episode:
        return True
    alliance, outcome = _derived_episode_parts(alliance_episode), _derived_episode_parts(outcome_episode)
    return (alliance is not None and outcome is not None and alliance[1] == outcome[1]
            and abs((alliance[0] - outcome[0]).days) <= 1)


def same_session_of_both_scales(alliance: tuple[str, int, datetime], outcome: tuple[str, int, datetime]) -> bool:
    """Whether a session of an alliance instrument and one of its paired outcome instrument, each
    given as (episode id, session number, administered at), are one session (docs/outcome.md): the
    same session number, and one episode of both scales (`same_episode_of_both_scales`), or two
    derived episodes and UTC dates of administration at most a day apart.

    The second case is a form missing at the first session of an episode (the ORS forgotten at
    session 1, or the SRS): each scale derives its episode from its own first session, so the two
    ids name two first session numbers, and the sessions both scales hold are still one session
    each (two forms of one number at most a day apart are one appointment's, as in
    `same_episode_of_both_scales`)."""
    (a_episode, a_number, a_at), (o_episode, o_number, o_at) = alliance, outcome
    if a_number != o_number:
        return False
    if same_episode_of_both_scales(a_episode, o_episode):
        return True
    return (a_episode.startswith(DERIVED_EPISODE_PREFIX) and o_episode.startswith(DERIVED_EPISODE_PREFIX)
            and abs((_utc_date(a_at) - _utc_date(o_at)).days) <= 1)


def _utc_date(at: datetime) -> date:
    """The UTC date of a time (a naive one is UTC, as scoring reads it)."""
    return (at.astimezone(UTC) if at.tzinfo else at).date()


def csv_submission_id(tenant_id: str, client_id: str, instrument: str, episode_id: str | None,
                      session_number: int, administered_day: str) -> str:
    """Intake's submission id of a CSV row without one, from its session (`administered_day`: the
    UTC date of administration, ISO): the same session always gets the same id."""
    return "csv:" + derive("csv-session", tenant_id, client_id, str(instrument), episode_id or "",
                           str(session_number), administered_day)


def client_record_id(tenant_id: str, client_id: str, instrument: str) -> str:
    """Reporting's key of a client's record of one instrument (every episode in it)."""
    return derive("client-record", tenant_id, client_id, str(instrument))


def reporting_counter_id(tenant_id: str, site_id: str, clinician_id: str, instrument: str, month: str) -> str:
    """Reporting's key of one counter document (a bucket of the incremental indices; `month` ""
    for the current episodes)."""
    return derive("reporting-counter", tenant_id, site_id, clinician_id, str(instrument), month)


def submission_status_id(tenant_id: str, submission_id: str, outcome: bool = False) -> str:
    """Reporting's key of a submission's status document: one per scale (`outcome`: the ORS family's)."""
    if outcome:
        return derive("outcome-submission-status", tenant_id, submission_id)
    return derive("submission-status", tenant_id, submission_id)


def fhir_session_ids(tenant_id: str, client_id: str, instrument: str, episode_id: str | None,
                     session_number: int) -> tuple[str, str]:
    """(QuestionnaireResponse id, Observation id) of one session in FHIR exports: stable across corrections."""
    parts = (tenant_id, client_id, str(instrument), episode_id or "", str(session_number))
    return derive("fhir-qr", *parts), derive("fhir-obs", *parts)


def fhir_bundle_id(tenant_id: str, record_id: str, episode_id: str | None) -> str:
    """Id of the FHIR Bundle exporting one episode (or a whole record) of a client's record."""
    return derive("fhir-bundle", tenant_id, record_id, episode_id or "")


# The consumer-side ids below predate `NAMESPACE`: they are UUIDv5s in the URL namespace over a
# `:`-joined text, kept as they are (dead letters already published carry them).


def dead_letter_event_id(service: str, topic: str, partition: int, offset: int, reason: str) -> str:
    """Event id of the dead letter of one consumed record: a redelivery dead-letters it again under this id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dl:{service}:{topic}:{partition}:{offset}:{reason}"))


def delivery_dead_letter_event_id(service: str, reason: str, delivery_id_: str) -> str:
    """Event id of the dead letter of a delivery that exhausted its attempts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dl:{service}:{reason}:{delivery_id_}"))


def record_correlation_id(topic: str, partition: int, offset: int) -> str:
    """The correlation id of a consumed record that carries none: the same on every redelivery."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kafka:{topic}:{partition}:{offset}"))


def store_key(*parts: str) -> str:
    """A store `_id` made of several ids: a JSON array, which keeps the parts apart whatever
    characters they hold (with a separator, tenant `t`'s `x:c1` and tenant `t:x`'s `c1` were one key)."""
    return json.dumps(list(parts), separators=(",", ":"))


def partition_key(tenant_id: str, client_id: str) -> bytes:
    """Kafka key that keeps one client's sessions ordered within a partition."""
    return f"{tenant_id}:{client_id}".encode()
