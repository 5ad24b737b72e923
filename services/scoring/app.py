"""The scoring service: consumes `srs.submitted.v1` and `ors.submitted.v1`, publishes
`srs.scored.v1`, `alliance.deterioration.v1` and `alliance.alert-status.v1`, their ORS
counterparts `ors.scored.v1`, `outcome.alert.v1` and `outcome.alert-status.v1` (and dead letters),
keeps per-client state in MongoDB.

HTTP is for operations only: /healthz, /readyz, /metrics.

Shape (the same in every service): `ScoringConfig` extends `shared.settings.ServiceConfig`;
`build(config)` wires a `shared.http.Service` (broker with its subscriber and publishers, store client,
runtime, ops HTTP app) without opening a connection: nothing outside reads scoring's inner parts, so it
declares no subclass of its own; `create_app` (uvicorn) and `asyncapi_app` (`faststream docs gen`) are
views of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.scoring.handlers import SERVICE, ScoringHandler, model_of
from services.scoring.settings import ScoringSettings
from services.scoring.store import RulesStore, StateCache, StateStore, SubmissionIndex
from shared import channels
from shared.channels import Channel
from shared.http import Adapters, Service, Views, service_api
from shared.kafka import DeadLetterTarget, subscribe_batch
from shared.settings import ServiceConfig

TITLE = "Alliance Stream scoring"
DESCRIPTION = (
    "Scores Session Rating Scale submissions with the PCOMS alliance rules (per-tenant cutoff, "
    "drop from the previous session, low and not improving) over each client's whole record: "
    "corrections publish new revisions, episodes are derived from restarts of the numbering, a "
    "client belongs to one site until transferred, and the latest session of the current episode "
    "raises, revises, supersedes or withdraws its alert (docs/clinical-records.md). Input: "
    "srs.submitted.v1 (submissions and client transfers); output: srs.scored.v1, "
    "alliance.deterioration.v1, alliance.alert-status.v1, srs.deadletter.v1. Outcome Rating Scale "
    "submissions (ors.submitted.v1) are scored in the same client records with the outcome rules "
    "(cutoff per age band, reliable change from intake, not on track; docs/outcome.md) and published "
    "on ors.scored.v1, outcome.alert.v1 and outcome.alert-status.v1; an alliance alert whose session's "
    "ORS triggers an outcome alert (superseded since by a later session's or not) is critical and says "
    "outcome_at_risk."
)


# What scoring publishes, with what a reader of each topic must know. Publishing goes through
# `Publisher` (many sends, one wait for all acks); `build` declares these for the AsyncAPI document.
OUTPUTS: tuple[tuple[Channel[Any], str], ...] = (
    (channels.SCORED,
     "One event per revision of a scored session (not for YCSRS): keep the highest "
     "revision per (client_id, submission_id); a revision with retracted set removes the "
     "session from that client (it moved to another). Key: tenant_id:client_id."),
    (channels.DETERIORATION,
     "An alert raised (revision 1) or revised by a correction (revision + 1) for the "
     "latest session of a client's current episode; alert_id is derived from the "
     "session, so redeliveries and revisions carry the same id."),
    (channels.ALERT_STATUS,
     "An alert superseded by a later session, or withdrawn by a correction that "
     "cleared it, naming the revision it ends."),
    (channels.ORS_SCORED,
     "One event per revision of a scored ORS-family session (docs/outcome.md): keep "
     "the highest revision per (client_id, submission_id); retracted: as on srs.scored.v1. "
     "Key: tenant_id:client_id."),
    (channels.OUTCOME_ALERT,
     "An outcome alert (reliable deterioration, not on track) raised or revised "
     "for the latest ORS session of a client's current episode; alert_id derived from"
     " the session."),
    (channels.OUTCOME_ALERT_STATUS,
     "An outcome alert superseded by a later session, or withdrawn by a correction "
     "that cleared it, naming the revision it ends."),
    (channels.DEADLETTER,
     "Submitted records scoring could not read or refused, with the reason "
     "(undecodable, invalid, unscorable, site_conflict, session_gap, duplicate, "
     "series_full)."),
)


@dataclass
class ScoringConfig(ServiceConfig, service=SERVICE):
    """Everything scoring reads from its environment."""

    scoring: ScoringSettings = field(default_factory=ScoringSettings)


def build(config: ScoringConfig) -> Service:
    """Wire broker, store and handler; opens no connection."""
    base = Adapters(config)
    broker, topics = base.broker, base.topics
    store = StateStore(base.db)
    states = StateCache(store, max_sessions=config.scoring.state_cache_sessions)
    rules = RulesStore(base.db, ttl_seconds=config.scoring.rules_cache_seconds)
    handler = ScoringHandler(states, rules, base.publisher.publish_all, topics,
                             conflict_attempts=config.scoring.conflict_attempts, save_chunk=config.scoring.save_chunk,
                             index=SubmissionIndex(base.db))
    # One consumer of both inputs: a client's SRS and ORS records come in the same batches, and
    # one ClientState (one document) holds both (docs/outcome.md).
    subscribe_batch(broker, (topics.submitted, topics.ors_submitted), group_id=config.kafka.group(SERVICE),
                    service=SERVICE, model=model_of, handler=handler,
                    max_records=config.scoring.max_records or config.kafka.batch_max_records,
                    dead_letters=DeadLetterTarget(topics.deadletter, base.publisher.publish_all),
                    settings=config.kafka)
    for channel, description in OUTPUTS:
        base.declare_output(channel, description)
    runtime = base.runtime()
    app = service_api(runtime, title=TITLE, description=DESCRIPTION)
    return Service(broker, base.mongo, runtime, app, spec_title=TITLE, spec_version="1.0.0",
                   spec_description=DESCRIPTION)


# `create_app` (uvicorn, `python -m services.scoring`) and `asyncapi_app` (`faststream docs gen`).
_views = Views(build, ScoringConfig)
create_app, asyncapi_app = _views.create_app, _views.asyncapi_app

