"""Response documents of the read API, for the OpenAPI description (answers are built by rules.py;
unit tests check that what it builds validates against these, field for field)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import AgeBand, AlertState, Instrument, Operator, OutcomeChange, OutcomeInstrument, Severity


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SessionHeadOut(_Out):
    session_number: int
    submission_id: str
    revision: int
    administered_at: datetime
    total: float
    items: dict[str, float] | None


class SessionOut(_SessionHeadOut):
    """One session as scoring scored it (its current revision)."""

    change_from_previous: float | None
    flags: list[str]
    below_cutoff: bool
    triggers: list[str]
    severity: Severity | None
    low_items: list[str]


class AlertOut(_Out):
    """An alert of the shown episode: its latest raise and its lifecycle status."""

    alert_id: str
    session_number: int | None
    severity: str | None
    triggers: list[str]
    low_items: list[str]
    raised_at: datetime | None
    acknowledged: bool
    status: AlertState
    revision: int


class EpisodeOut(_Out):
    episode_id: str | None
    derived: bool
    first_administered_at: datetime
    last_administered_at: datetime
    session_count: int


class AlertMarkOnSessionOut(_Out):
    """The alert of one session, as marked on a series. `outcome_at_risk` (alliance alerts only):
    the ORS of the same session triggers an outcome alert (superseded since or not), which made
    this alert critical."""

    alert_id: str
    severity: str | None
    triggers: list[str]
    status: AlertState
    acknowledged: bool
    revision: int
    outcome_at_risk: bool | None = None


class OutcomeSessionOut(_SessionHeadOut):
    """One ORS-family session as scoring scored it (its current revision): change from the
    episode's intake session and from the previous one, the reliable change category, clinical
    significance and range; YCORS sessions carry the total only."""

    cutoff: float | None
    intake_total: float | None
    change_from_intake: float | None
    change_from_previous: float | None
    change: OutcomeChange | None
    clinically_significant_improvement: bool
    in_clinical_range: bool | None
    flags: list[str]
    triggers: list[str]
    severity: Severity | None
    alert: AlertMarkOnSessionOut | None


class OutcomeAlertOut(_Out):
    """An outcome alert of the shown episode: its latest raise and its lifecycle status."""

    alert_id: str
    session_number: int | None
    severity: str | None
    triggers: list[str]
    raised_at: datetime | None
    acknowledged: bool
    status: AlertState
    revision: int
    advice: str


class BandOut(_Out):
    low: float
    high: float


class OutcomeSeriesOut(_Out):
    """The ORS series of the shown episode (the outcome instrument paired with the trajectory's:
    ORS for SRS/GSRS, CORS for CSRS/CGSRS, YCORS for YCSRS). `reliable_change_band` is the
    intake total ± the reliable change index: a session outside it changed reliably."""

    instrument: OutcomeInstrument
    episode_id: str | None
    age_band: AgeBand | None
    cutoff: float | None
    reliable_change_index: float | None
    intake_total: float | None
    reliable_change_band: BandOut | None
    latest_total: float | None
    change_from_intake: float | None
    change: OutcomeChange | None
    clinically_significant_improvement: bool
    in_clinical_range: bool | None
    sessions: list[OutcomeSessionOut]
    alerts: list[OutcomeAlertOut]


class AlignedSrsOut(_Out):
    submission_id: str
    total: float
    cutoff: float
    below_cutoff: bool
    severity: Severity | None
    alert: AlertMarkOnSessionOut | None


class AlignedOrsOut(_Out):
    submission_id: str
    total: float
    cutoff: float | None
    change_from_intake: float | None
    change: OutcomeChange | None
    clinically_significant_improvement: bool
    in_clinical_range: bool | None
    severity: Severity | None
    alert: AlertMarkOnSessionOut | None


class AlignedSessionOut(_Out):
    """One session of the shown episode on both scales (None where a scale has no session)."""

    episode_id: str | None
    session_number: int
    srs: AlignedSrsOut | None
    ors: AlignedOrsOut | None


class TrajectoryOut(_Out):
    """One client's trajectory on one instrument: the current episode (or the one asked for),
    with the list of every episode, most recent first; with the outcome series of the same
    episode (`outcome`, null when the client has no ORS record) and both side by side by
    session (`aligned`)."""

    client_id: str
    instrument: Instrument
    episode_id: str | None
    age_band: str
    site_id: str
    clinician_id: str
    # Null (and `sessions` empty) only for a client with outcome sessions and none on `instrument`.
    cutoff: float | None
    operator: Operator | None
    sessions: list[SessionOut]
    latest_total: float | None
    at_risk: bool
    below_cutoff: bool
    declining: bool
    alerts: list[AlertOut]
    episodes: list[EpisodeOut]
    outcome: OutcomeSeriesOut | None
    aligned: list[AlignedSessionOut]


class PointOut(_Out):
    session_number: int
    total: float
    below_cutoff: bool


class AlertMarkOut(_Out):
    session_number: int | None
    severity: str | None
    acknowledged: bool
    status: AlertState


class CaseloadOutcomeOut(_Out):
    """The current episode's latest outcome (ORS) session of a client listed without alliance sessions."""

    instrument: OutcomeInstrument
    latest_total: float
    latest_session_number: int
    latest_administered_at: datetime
    session_count: int
    cutoff: float | None
    change_from_intake: float | None
    change: OutcomeChange | None
    alerts: list[AlertMarkOut]


class CaseloadEntryOut(_Out):
    """One client of a caseload. A client with outcome sessions only has its alliance fields null
    (no points or alerts, not at risk) and `outcome` filled; for every other client `outcome` is null."""

    client_id: str
    instrument: Instrument
    episode_id: str | None
    episode_count: int
    site_id: str
    at_risk: bool
    below_cutoff: bool
    declining: bool
    latest_total: float | None
    latest_session_number: int | None
    latest_administered_at: datetime | None
    session_count: int
    cutoff: float | None
    points: list[PointOut]
    alerts: list[AlertMarkOut]
    outcome: CaseloadOutcomeOut | None


class CaseloadOut(_Out):
    """One page of a clinician's caseload, at-risk trajectories first."""

    clinician_id: str
    clients: list[CaseloadEntryOut]
    next_cursor: str | None


class IndicesOut(_Out):
    clients: int
    trajectories: int
    sessions: int
    mean_sessions_per_client: float | None
    mean_first_session_total: float | None
    mean_latest_total: float | None
    pct_sessions_below_cutoff: float | None
    trajectories_at_risk: int


class InstrumentIndicesOut(IndicesOut):
    instrument: Instrument
    age_band: str


class AgeBandIndicesOut(IndicesOut):
    age_band: str


class AlertCountsOut(_Out):
    raised: int
    acknowledged: int


class ShareOut(_Out):
    count: int
    pct: float | None  # of the clients with a scored outcome session


class OutcomeIndicesOut(_Out):
    """Outcome (ORS/CORS) indices of a scope, by each client's latest scored outcome session of
    their current episode, as scoring decided it: clients by reliable change category, the mean
    change from intake to that session, the sample SD of the intake totals and the pre-post effect
    size (mean change / that SD; null below two clients or with no spread)."""

    clients: int
    reliable_improvement: ShareOut
    clinically_significant_improvement: ShareOut
    reliable_deterioration: ShareOut
    no_reliable_change: ShareOut
    mean_intake_total: float | None
    mean_change_from_intake: float | None
    intake_sd: float | None
    effect_size: float | None


class SummaryOut(IndicesOut):
    """PCOMS indices of a tenant, a site or a clinician (age band derived from the instrument),
    with the outcome indices of the same scope."""

    tenant_id: str
    site_id: str | None
    clinician_id: str | None = None  # set on a clinician's summary
    clients_at_risk: int
    alerts: AlertCountsOut
    by_instrument: list[InstrumentIndicesOut]
    by_age_band: list[AgeBandIndicesOut]
    outcome: OutcomeIndicesOut
    as_of: datetime  # when the counters were read (a summary is cached for a few seconds)


class TrendPointOut(_Out):
    """One month of a scope (UTC calendar month of the sessions' `administered_at`)."""

    month: str
    sessions: int
    clients_seen: int  # records with a session that month: one client on one instrument each
    pct_sessions_below_cutoff: float | None
    episodes_ending: int  # episodes whose latest session falls in this month
    mean_change_first_to_latest: float | None  # over those episodes: latest total - first total
    alerts_raised: int  # alerts first raised this month (a revised alert counts once)
    alerts_acknowledged: int  # of those, the ones a clinician acknowledged (whenever that was)
    # median of their times to acknowledge, read from a histogram of four bins per doubling:
    # within 9.1% above one minute, within 30 s below; None when none was acknowledged
    median_seconds_to_acknowledge: float | None


class TrendsOut(_Out):
    """Monthly series of a tenant, a site or a clinician, every month from `from` to `to`."""

    tenant_id: str
    site_id: str | None
    clinician_id: str | None
    from_month: str
    to_month: str
    as_of: datetime
    months: list[TrendPointOut]


class SitesOut(_Out):
    """The sites a key may read trends and summaries of (the network page's site picker)."""

    tenant_id: str
    bound_to: str | None  # the key's site when it is bound to one: then `sites` is that site alone
    sites: list[str]


class SubmissionOut(_Out):
    """What happened to one submission."""

    submission_id: str
    status: Literal["scored", "superseded", "rejected"]
    reason: str | None
    detail: str | None
    revision: int | None
    superseded_by: str | None
    client_id: str | None
    episode_id: str | None
    session_number: int | None
    total: float | None
    flags: list[str]
    rejected_at: datetime | None
    scale: Literal["alliance", "outcome"] = Field(
        description="the scale the submission rates: `alliance` (SRS family) or `outcome` (ORS family); a "
                    "submission id names one submission per scale")
    instrument: str | None = Field(description="the instrument of the submission as it was last scored or rejected")


class SubmissionsPageOut(_Out):
    """One page of a tenant's rejected submissions, oldest rejection first."""

    submissions: list[SubmissionOut]
    next_cursor: str | None
