"""One client's series (tenant, client, instrument, episode): its sessions and what was emitted.

Pure, in memory; `store.py` maps it to one MongoDB document. Two things live here:

- the *current* version of each session number. A second submission for the same session
  number is a correction; the one intake accepted last (then the larger submission id, so the
  choice never depends on arrival order) is current;
- the *outcome* computed for every submission id ever scored, so a redelivery returns the
  stored outcome (same flags, same `scored_at`) instead of computing a different one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.scoring import rules as R
from shared.events import SCORED_INSTRUMENTS, Instrument, Items, Severity


@dataclass(frozen=True)
class Submission:
    """What the series needs from one submitted event."""

    submission_id: str
    session_number: int
    instrument: Instrument
    accepted_at: datetime
    items: Items | None = None
    total: float | None = None

    def order(self) -> tuple[datetime, str]:
        """Which of two versions of a session is newer, independent of arrival order."""
        return (self.accepted_at, self.submission_id)


@dataclass(frozen=True)
class Entry:
    """A stored version of one session."""

    submission_id: str
    session_number: int
    total: float | None
    accepted_at: datetime

    def order(self) -> tuple[datetime, str]:
        return (self.accepted_at, self.submission_id)


@dataclass(frozen=True)
class Outcome:
    """What scoring decided for one submission; re-emitted unchanged on redelivery.

    `scored` is false for audit-only instruments (YCSRS): nothing is published for them.
    """

    scored: bool
    scored_at: datetime
    total: float | None = None
    cutoff: float | None = None
    previous_total: float | None = None
    change_from_previous: float | None = None
    flags: tuple[str, ...] = ()
    latest: bool = False
    triggers: tuple[str, ...] = ()
    severity: Severity | None = None

    @property
    def alert(self) -> bool:
        return self.severity is not None


@dataclass
class History:
    """Every submission of one series with its outcome; `version` guards concurrent writers."""

    entries: dict[str, Entry] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    version: int = 0

    def copy(self) -> History:
        """An independent copy (entries and outcomes are immutable, so the dicts suffice)."""
        return History(dict(self.entries), dict(self.outcomes), self.version)

    def current(self) -> dict[int, Entry]:
        """The current version of each session number."""
        out: dict[int, Entry] = {}
        for e in self.entries.values():
            have = out.get(e.session_number)
            if have is None or e.order() > have.order():
                out[e.session_number] = e
        return out

    def previous(self, session_number: int, current: dict[int, Entry] | None = None) -> Entry | None:
        """The closest earlier session (by number) that has a total."""
        cur = self.current() if current is None else current
        earlier = [n for n, e in cur.items() if n < session_number and e.total is not None]
        return cur[max(earlier)] if earlier else None

    def apply(self, sub: Submission, rules: R.TenantRules, now: datetime) -> tuple[Outcome, bool]:
        """Score one submission against the series. Returns (outcome, fresh).

        A submission id seen before returns its stored outcome (fresh=False) and changes nothing,
        so duplicates and redeliveries are harmless. Raises `rules.Unscorable` for a scored
        instrument without a usable total (the caller dead-letters it; nothing is stored).
        """
        known = self.outcomes.get(sub.submission_id)
        if known is not None:
            return known, False
        if sub.instrument not in SCORED_INSTRUMENTS:
            # Audit record only: keep what was given, never score, never alert.
            total: float | None
            try:
                total = R.total_of(sub.items, sub.total)
            except R.Unscorable:
                total = None
            self._add(sub, total)
            out = Outcome(scored=False, scored_at=now, total=total)
            self.outcomes[sub.submission_id] = out
            return out, True
        total = R.total_of(sub.items, sub.total)
        current = self.current()
        have = current.get(sub.session_number)
        is_current = have is None or sub.order() > have.order()
        latest = is_current and R.is_latest(sub.session_number, current)
        prev = self.previous(sub.session_number, current)
        s = R.score(total, sub.items, None if prev is None else prev.total, latest,
                    rules.for_instrument(sub.instrument))
        out = Outcome(
            scored=True, scored_at=now, total=s.total, cutoff=s.cutoff, previous_total=s.previous_total,
            change_from_previous=s.change_from_previous, flags=s.flags, latest=s.latest,
            triggers=s.alert.triggers if s.alert else (), severity=s.alert.severity if s.alert else None,
        )
        self._add(sub, total)
        self.outcomes[sub.submission_id] = out
        return out, True

    def _add(self, sub: Submission, total: float | None) -> None:
        self.entries[sub.submission_id] = Entry(sub.submission_id, sub.session_number, total, sub.accepted_at)

    def view(self, rules: R.TenantRules, instrument: Instrument) -> dict[int, R.Scoring]:
        """Every current session scored against the whole series as it stands now (what a
        trajectory shows once all sessions are in, whatever order they arrived in). Items are
        not kept in the series, so `item_below_threshold` is not part of this view."""
        cur = self.current()
        top = max(cur, default=0)
        resolved = rules.for_instrument(instrument)
        out: dict[int, R.Scoring] = {}
        for n, e in sorted(cur.items()):
            if e.total is None:
                continue
            prev = self.previous(n, cur)
            out[n] = R.score(e.total, None, None if prev is None else prev.total, n == top, resolved)
        return out
