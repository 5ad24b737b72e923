"""PCOMS outcome rules (the Outcome Rating Scale family): pure functions over numbers, no I/O, no clock.

Defaults (each overridable per tenant and per outcome instrument, `OutcomeRules`; the contract is
docs/outcome.md):

- total = sum of the four items (0.0-10.0 each), or the given total (0.0-40.0), one decimal;
- age band: `ORS` with `client_age` 13-17 -> adolescent, any other age or none -> adult; `CORS` ->
  child; `YCORS` -> young_child, which is stored and shown but never scored (no cutoff, no
  change, no flags, no alert);
- clinical cutoff per band: adult 25, adolescent 28, child 32; `in_clinical_range`: total < cutoff;
- reliable change index (RCI) 5 points, measured from the episode's first session (its intake):
  change_from_intake >= +RCI is `reliable_improvement`, <= -RCI `reliable_deterioration`, anything
  between `no_reliable_change`. The first session is its own intake: change 0, no reliable change;
- `clinically_significant_improvement`: a reliable improvement from an intake below the cutoff to a
  total at or above it (the cutoff of the session being scored: a client who turns 18 during an
  episode is read against the adult norms from then on);
- `not_on_track`: no reliable improvement at a session numbered at or above
  `not_on_track_warning_session` (3). The number is the session_number the clinic gave;
- an outcome alert is raised when `reliable_deterioration` or `not_on_track` holds AND the session
  is the latest of the client's current episode (of its instrument). Severity `critical` for a
  reliable deterioration, or for not_on_track at or above `not_on_track_critical_session` (6);
  otherwise `warning`.

Boundaries: every number is rounded to one decimal (`rules.r1`) before it is compared, as the SRS
rules do: a change of exactly +5.0 is reliable, +4.9 is not, and 24.99999 is read as 25.0 (at the
adult cutoff, so not in the clinical range).

Sources (docs/outcome.md cites them): the adult cutoff of 25 and the reliable change index of 5
come from Miller, Duncan, Brown, Sparks & Claud (2003), "The Outcome Rating Scale: a preliminary
study of the reliability, validity, and feasibility of a brief visual analog measure", Journal of
Brief Therapy 2(2), 91-100; the adolescent cutoff of 28 and the CORS cutoff of 32 from Duncan,
Sparks, Miller, Bohanske & Claud (2006), "Giving youth a voice: a preliminary study of the
reliability and validity of a brief outcome measure for children, adolescents, and caretakers",
Journal of Brief Therapy 5(2), 71-88. The not-on-track sessions (3 and 6) are this product's
defaults, configurable per tenant.
"""

from __future__ import annotations

from services.scoring.rules import OutcomeRules, r1
from shared.events import AgeBand, OutcomeChange, OutcomeFlag, OutcomeInstrument, OutcomeScore, Severity

# Plain strings (see rules.py: they enter stored digests, whose `repr` must not name a class).
IN_CLINICAL_RANGE = OutcomeFlag.IN_CLINICAL_RANGE.value
RELIABLE_IMPROVEMENT = OutcomeFlag.RELIABLE_IMPROVEMENT.value
RELIABLE_DETERIORATION = OutcomeFlag.RELIABLE_DETERIORATION.value
NO_RELIABLE_CHANGE = OutcomeFlag.NO_RELIABLE_CHANGE.value
CLINICALLY_SIGNIFICANT_IMPROVEMENT = OutcomeFlag.CLINICALLY_SIGNIFICANT_IMPROVEMENT.value
NOT_ON_TRACK = OutcomeFlag.NOT_ON_TRACK.value
OUTCOME_FLAG_NAMES: tuple[str, ...] = tuple(f.value for f in OutcomeFlag)
OUTCOME_TRIGGERS: tuple[str, ...] = (RELIABLE_DETERIORATION, NOT_ON_TRACK)

ADVICE_DETERIORATION = ("The client reports reliably worse than at intake: discuss with the client how they are "
                        "doing; consider changing the approach or a referral.")
ADVICE_NOT_ON_TRACK_CRITICAL = ("No reliable improvement since intake: discuss with the client how they are "
                                "doing; consider changing the approach or a referral.")
ADVICE_NOT_ON_TRACK_WARNING = ("No reliable improvement since intake yet: discuss with the client how they are "
                               "doing and what could help.")


# --- the rules ---------------------------------------------------------------------------------


def age_band(instrument: OutcomeInstrument | str, client_age: int | None) -> AgeBand:
    """Whose norms the total is read against."""
    if str(instrument) == OutcomeInstrument.CORS.value:
        return AgeBand.CHILD
    if str(instrument) == OutcomeInstrument.YCORS.value:
        return AgeBand.YOUNG_CHILD
    return AgeBand.ADOLESCENT if client_age is not None and 13 <= client_age <= 17 else AgeBand.ADULT


def change_class(change_from_intake: float, reliable_change: float) -> OutcomeChange:
    """Reliable improvement (>= +RCI), reliable deterioration (<= -RCI), or neither."""
    change, rci = r1(change_from_intake), r1(reliable_change)
    if change >= rci:
        return OutcomeChange.RELIABLE_IMPROVEMENT
    if change <= -rci:
        return OutcomeChange.RELIABLE_DETERIORATION
    return OutcomeChange.NO_RELIABLE_CHANGE


def in_clinical_range(total: float, cutoff: float) -> bool:
    """The total is below the cutoff of the client's band."""
    return r1(total) < r1(cutoff)


def clinically_significant(change: OutcomeChange, intake_total: float, total: float, cutoff: float) -> bool:
    """A reliable improvement that crossed the cutoff from below."""
    return (change is OutcomeChange.RELIABLE_IMPROVEMENT and in_clinical_range(intake_total, cutoff)
            and not in_clinical_range(total, cutoff))


def not_on_track(change: OutcomeChange, session_number: int, rules: OutcomeRules) -> bool:
    """No reliable improvement by the tenant's first not-on-track session."""
    return change is not OutcomeChange.RELIABLE_IMPROVEMENT and session_number >= rules.not_on_track_warning_session


def severity(triggers: tuple[str, ...], session_number: int, rules: OutcomeRules) -> Severity:
    """Critical for a reliable deterioration or from the second not-on-track session on."""
    late = NOT_ON_TRACK in triggers and session_number >= rules.not_on_track_critical_session
    return Severity.CRITICAL if RELIABLE_DETERIORATION in triggers or late else Severity.WARNING


def advice(triggers: tuple[str, ...] | list[str], severity_: Severity | str) -> str:
    """What the clinician is asked to do about an outcome alert (docs/outcome.md)."""
    if RELIABLE_DETERIORATION in triggers:
        return ADVICE_DETERIORATION
    if str(severity_) == Severity.CRITICAL.value:
        return ADVICE_NOT_ON_TRACK_CRITICAL
    return ADVICE_NOT_ON_TRACK_WARNING


class OutcomeScoring(OutcomeScore):
    """Everything the rules say about one ORS-family session: what its `ors.scored.v1` event
    carries, and whether the session holds an alert. `triggers` and `severity` are what an alert
    would carry if the session were the latest."""

    alert: bool = False


def score_outcome(instrument: OutcomeInstrument | str, client_age: int | None, total: float,
                  intake_total: float | None, previous_total: float | None, session_number: int, latest: bool,
                  rules: OutcomeRules) -> OutcomeScoring:
    """Apply every outcome rule to one session. `intake_total` is the total of the episode's first
    session (None: this is the first), `previous_total` that of the session before it."""
    band = age_band(instrument, client_age)
    total = r1(total)
    cutoff = rules.cutoff(band)
    if cutoff is None:
        return OutcomeScoring.model_construct(total=total, age_band=band)
    intake = total if intake_total is None else r1(intake_total)
    prev = None if previous_total is None else r1(previous_total)
    from_intake = r1(total - intake)
    change = change_class(from_intake, rules.reliable_change)
    significant = clinically_significant(change, intake, total, cutoff)
    in_range = in_clinical_range(total, cutoff)
    holds = {
        IN_CLINICAL_RANGE: in_range,
        RELIABLE_IMPROVEMENT: change is OutcomeChange.RELIABLE_IMPROVEMENT,
        RELIABLE_DETERIORATION: change is OutcomeChange.RELIABLE_DETERIORATION,
        NO_RELIABLE_CHANGE: change is OutcomeChange.NO_RELIABLE_CHANGE,
        CLINICALLY_SIGNIFICANT_IMPROVEMENT: significant,
        NOT_ON_TRACK: not_on_track(change, session_number, rules),
    }
    flags = tuple(f for f in OUTCOME_FLAG_NAMES if holds[f])
    triggers = tuple(f for f in OUTCOME_TRIGGERS if holds[f])
    # Built without validation: every value comes from the rules above (and this runs per session).
    return OutcomeScoring.model_construct(
        total=total, age_band=band, cutoff=r1(cutoff), reliable_change_index=r1(rules.reliable_change),
        intake_total=intake, change_from_intake=from_intake, previous_total=prev,
        change_from_previous=None if prev is None else r1(total - prev), change=change,
        clinically_significant_improvement=significant, in_clinical_range=in_range, flags=list(flags),
        triggers=list(triggers), severity=severity(triggers, session_number, rules) if triggers else None,
        alert=latest and bool(triggers))
