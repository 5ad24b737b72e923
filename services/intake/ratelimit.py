"""Intake's limit per API key, counted in submissions (`shared.ratelimit.Limiter`, shared by every
intake replica through the store).

Every request an authenticated client makes is paid for, accepted or not: intake parses and
validates a rejected body just as it does an accepted one, so invalid bodies must not be a free
way to keep it busy. The API (services/intake/api.py) uses the limiter three ways:

- `wait(key)` before the body is read: a key with no room left gets 429 at once, so a client in
  debt costs a key look-up and a counter read, never a body.
- `take(key, cost)` once the body is understood: the submissions it holds (1, the batch's items,
  the file's rows), refused with 429 when they do not fit.
- `charge(key, cost)` when the request is rejected before `take` (413, 415, 422 for JSON, the
  batch envelope, the CSV file): the work done so far, spent even when over the limit, down to a
  debt of at most one burst. The cost is proportional to the work: one unit per item or CSV row
  parsed, one per `max_single_bytes` of body read (what one submission may weigh), at least one.
  A 4 MiB body refused as too large costs 64 units, a CSV refused at the row limit its limit + 1 rows.

`ALLIANCE_INTAKE_RATE_BURST` submissions per window of `ceil(burst / rate)` seconds (2000 per 4 s by
default), as a sliding window.
"""

from __future__ import annotations

from services.intake.settings import IntakeSettings
from shared.ratelimit import Limiter, SlotStorage, retry_after_header

__all__ = ["Limiter", "retry_after_header", "submission_limiter"]


def submission_limiter(settings: IntakeSettings, storage: SlotStorage, lease: int = 1) -> Limiter:
    """The per-key submissions limit from intake's settings (`lease`: `ALLIANCE_INTAKE_RATE_LIMIT_LEASE`)."""
    return Limiter(storage, "intake:submissions", settings.rate_per_second, settings.rate_burst, lease)
