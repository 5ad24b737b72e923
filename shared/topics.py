"""Topic names, defined once. Everything else refers to these constants."""

from __future__ import annotations

from dataclasses import dataclass

SUBMITTED = "srs.submitted.v1"
SCORED = "srs.scored.v1"
DETERIORATION = "alliance.deterioration.v1"
DEADLETTER = "srs.deadletter.v1"
ALERT_STATUS = "alliance.alert-status.v1"
NOTIFY_RETRY = "alliance.notify-retry.v1"
# The Outcome Rating Scale (docs/outcome.md): its own topics, so the SRS contracts stay as they were.
ORS_SUBMITTED = "ors.submitted.v1"
ORS_SCORED = "ors.scored.v1"
OUTCOME_ALERT = "outcome.alert.v1"
OUTCOME_ALERT_STATUS = "outcome.alert-status.v1"

ALL_TOPICS: tuple[str, ...] = (SUBMITTED, SCORED, DETERIORATION, DEADLETTER, ALERT_STATUS, NOTIFY_RETRY,
                                ORS_SUBMITTED, ORS_SCORED, OUTCOME_ALERT, OUTCOME_ALERT_STATUS)


@dataclass(frozen=True)
class Topics:
    """Concrete topic names for one deployment.

    A prefix lets tests (and shared clusters) keep their data apart without changing any
    code path: production uses the empty prefix.
    """

    prefix: str = ""

    @property
    def submitted(self) -> str:
        return self.prefix + SUBMITTED

    @property
    def scored(self) -> str:
        return self.prefix + SCORED

    @property
    def deterioration(self) -> str:
        return self.prefix + DETERIORATION

    @property
    def deadletter(self) -> str:
        return self.prefix + DEADLETTER

    @property
    def alert_status(self) -> str:
        return self.prefix + ALERT_STATUS

    @property
    def notify_retry(self) -> str:
        return self.prefix + NOTIFY_RETRY

    @property
    def ors_submitted(self) -> str:
        return self.prefix + ORS_SUBMITTED

    @property
    def ors_scored(self) -> str:
        return self.prefix + ORS_SCORED

    @property
    def outcome_alert(self) -> str:
        return self.prefix + OUTCOME_ALERT

    @property
    def outcome_alert_status(self) -> str:
        return self.prefix + OUTCOME_ALERT_STATUS

    def all(self) -> tuple[str, ...]:
        return tuple(self.prefix + t for t in ALL_TOPICS)

    def logical(self, concrete: str) -> str:
        """Strip the deployment prefix, giving the contract name (e.g. for webhook headers)."""
        return concrete[len(self.prefix) :] if self.prefix and concrete.startswith(self.prefix) else concrete
