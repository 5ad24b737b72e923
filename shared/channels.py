"""Which event each topic carries, said once for the whole platform.

A `Channel` pairs a topic's logical name (`shared/topics.py`) with its event model
(`shared/events.py`): publishers declare their outputs' schemas from it, consumers decode with
its model, and the AsyncAPI documents (`tools/contracts.py`) take each consumed topic's payload
from `TOPIC_EVENTS`. A service names only the channels it uses, never the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from shared import events, topics

E = TypeVar("E", bound=BaseModel)


@dataclass(frozen=True)
class Channel(Generic[E]):
    """A topic and the one event model its records carry."""

    topic: str  # the logical name; a deployment's concrete name is `Topics.prefix + topic`
    model: type[E]

    def on(self, deployment: topics.Topics) -> str:
        """The topic's concrete name in `deployment` (its prefix, if any, before the logical name)."""
        return deployment.prefix + self.topic


SCORED = Channel(topics.SCORED, events.SrsScored)
DETERIORATION = Channel(topics.DETERIORATION, events.AllianceDeterioration)
ALERT_STATUS = Channel(topics.ALERT_STATUS, events.AlertStatusChanged)
DEADLETTER = Channel(topics.DEADLETTER, events.DeadLetter)
ORS_SCORED = Channel(topics.ORS_SCORED, events.OrsScored)
OUTCOME_ALERT = Channel(topics.OUTCOME_ALERT, events.OutcomeAlert)
OUTCOME_ALERT_STATUS = Channel(topics.OUTCOME_ALERT_STATUS, events.OutcomeAlertStatusChanged)

_SINGLE: tuple[Channel[Any], ...] = (SCORED, DETERIORATION, ALERT_STATUS, DEADLETTER, ORS_SCORED,
                                    OUTCOME_ALERT, OUTCOME_ALERT_STATUS)

# Every event a consumer of each topic may read (logical names). `srs.submitted.v1` carries three
# kinds (a submission, a client's transfer, or scoring's retraction of a moved submission) and
# `ors.submitted.v1` two (a submission, or the copy of a client's transfer intake publishes on
# both), so neither has a single `Channel`.
TOPIC_EVENTS: dict[str, tuple[type[BaseModel], ...]] = {
    topics.SUBMITTED: (events.SrsSubmitted, events.ClientTransfer, events.SubmissionRetraction),
    topics.ORS_SUBMITTED: (events.OrsSubmitted, events.ClientTransfer),
    **{c.topic: (c.model,) for c in _SINGLE},
}
