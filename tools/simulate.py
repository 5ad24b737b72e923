"""A synthetic clinic network that posts realistic SRS series (and, with `--ors`, the ORS of each
session) through the intake API.

`alliance simulate --tenants N --sites N --clinicians N --clients N --rate R --duration S`

Two halves, kept apart so the first can be tested without any I/O:

- `iter_plan(...)` / `plan(...)` generate the run deterministically from a seed: which client gives
  which rating, which submissions are retries of earlier ones, which sessions arrive late, which
  bodies are invalid, and which go through the batch endpoint. `iter_plan` streams (a week-long
  demo run never holds its whole plan in memory); `plan` is the same stream as a list.
- `send(...)` posts a plan to intake at the offered rate (open loop: each request is due at
  `submissions_before / rate` seconds after the start), stops by itself after `duration`, and counts
  what intake answered.

The network: `sites`, `clinicians` and `clients` are totals, spread round-robin (sites over tenants,
clinicians over sites, clients over clinicians). `clients` is the active caseload: each client
comes for a course of 6-20 weekly sessions and is then discharged, and a new client takes the
slot. Each client follows one alliance trajectory: most are high and stable (totals ~36-40), some
decline session by session, some start low and recover. A few fill in the child (CSRS) or group
(GSRS) form, and some come from EHR exports that only carry a total.

With the ORS (`Mix.ors`, on by default for `alliance simulate`; `--no-ors` posts the SRS alone, as
before) every session is two forms, as in PCOMS: the ORS at its start (50 minutes before the SRS;
CORS for the CSRS clients, with a `client_age`) and the SRS at its end, posted in that order. Each
client also follows an outcome trajectory, drawn in correlation with their alliance: improvers
(mostly among clients whose alliance is high or recovering), non-responders, deteriorators (mostly
among those whose alliance declines: their SRS falls too) and dropouts (a course cut to 1-4
sessions). The SRS stream of a seed is the same as without the ORS, except that dropouts end early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.events import ITEM_NAMES, ORS_ITEM_NAMES, OUTCOME_OF, Instrument
from tools.console import run_command

Kind = Literal["new", "duplicate", "late", "invalid"]
Trajectory = Literal["stable_high", "declining", "low_recovering"]
OutcomeTrajectory = Literal["improver", "non_responder", "deteriorator", "dropout"]
ITEMS = ITEM_NAMES
# How each alliance trajectory's clients fare in outcome (shares; the rest improve): a falling
# alliance mostly goes with a client getting worse, a good one mostly with a client getting better.
OUTCOME_SHARES: dict[Trajectory, tuple[tuple[OutcomeTrajectory, float], ...]] = {
    "stable_high": (("non_responder", 0.2), ("deteriorator", 0.04), ("dropout", 0.06)),
    "low_recovering": (("non_responder", 0.3), ("deteriorator", 0.05), ("dropout", 0.15)),
    "declining": (("non_responder", 0.25), ("deteriorator", 0.55), ("dropout", 0.15)),
}
ORS_BEFORE_SRS = timedelta(minutes=50)  # the ORS opens the session, the SRS closes it
DEFAULT_NOW = datetime(2026, 1, 1, tzinfo=UTC)
POOL_CONNECTIONS = 8  # connections per HTTP client of the load generator (`send`: why several small pools)

# Rules of issue 3 the planner breaks on purpose; each must get a 422 (or a rejected batch item).
INVALID_RULES: tuple[str, ...] = (
    "item_out_of_range", "item_two_decimals", "items_and_total", "neither_items_nor_total",
    "partial_items", "unknown_instrument", "session_number_zero", "timestamp_without_offset",
    "timestamp_in_future", "bad_submission_id", "unknown_field", "empty_client_id",
)


@dataclass(frozen=True)
class Mix:
    """Shares of the generated stream (fractions of all planned submissions, or of clients)."""

    # trajectories, as fractions of clients (the rest are stable_high)
    declining: float = 0.12
    low_recovering: float = 0.10
    # per client
    total_only: float = 0.08
    csrs: float = 0.05
    gsrs: float = 0.04
    episodes: float = 0.3
    course: tuple[int, int] = (6, 20)  # weekly sessions before discharge
    # per submission
    duplicate: float = 0.05
    late: float = 0.04
    invalid: float = 0.02
    # fraction of steps that are an EHR batch export (POST /v1/submissions/batch) instead of a single post
    batch_steps: float = 0.015
    batch_size: tuple[int, int] = (5, 40)
    # the ORS at the start of every session (off: the SRS alone, the stream of earlier versions)
    ors: bool = False
    adolescents: float = 0.15  # of the ORS clients: aged 13-17 (their cutoff differs)


@dataclass(frozen=True)
class Client:
    """One simulated client: where they are seen, which form they fill in, how their alliance moves."""

    slot: int  # caseload slot; when a client is discharged, a new client takes the slot
    generation: int
    tenant: int
    site_id: str
    clinician_id: str
    client_id: str
    trajectory: Trajectory
    instrument: str
    total_only: bool
    episode_id: str | None
    start_total: float
    slope: float  # change of the expected total per session
    course: int  # sessions before discharge
    anchor: datetime  # administered_at of session 1; sessions are weekly
    # the outcome half (only with `Mix.ors`): trajectory, intake ORS total, change per session, age
    outcome: OutcomeTrajectory | None = None
    ors_start: float = 0.0
    ors_slope: float = 0.0
    client_age: int | None = None

    def administered_at(self, session_number: int) -> str:
        return (self.anchor + timedelta(weeks=session_number - 1)).isoformat()

    def ors_administered_at(self, session_number: int) -> str:
        return (self.anchor + timedelta(weeks=session_number - 1) - ORS_BEFORE_SRS).isoformat()


@dataclass(frozen=True)
class PlannedSubmission:
    """One submission as it will be posted, and what the simulator expects intake to answer."""

    seq: int
    tenant: int
    kind: Kind
    body: dict[str, Any]
    batch: int | None = None  # submissions sharing a batch id go in one batch request, in order
    client: int | None = None  # the caseload slot of the client
    session_number: int | None = None
    invalid_rule: str | None = None
    trajectory: Trajectory | None = None
    outcome: OutcomeTrajectory | None = None  # the client's (with `Mix.ors`)

    @property
    def ors(self) -> bool:
        """An outcome rating (ORS, CORS) rather than an SRS-family one."""
        return self.body.get("instrument") in ("ORS", "CORS", "YCORS")

    @property
    def submission_id(self) -> str:
        return str(self.body.get("submission_id", ""))

    @property
    def valid(self) -> bool:
        return self.kind != "invalid"


@dataclass(frozen=True)
class Network:
    """The synthetic network: tenants index the submit keys; clients are the first generation per slot."""

    tenants: int
    sites: tuple[tuple[int, str], ...]  # (tenant, site_id)
    clinicians: tuple[tuple[int, str, str], ...]  # (tenant, site_id, clinician_id)
    clients: tuple[Client, ...]


def new_client(slot: int, generation: int, clinician: tuple[int, str, str], rng: random.Random, run: str,
               mix: Mix, first_seen: datetime, seed: int = 0) -> Client:
    """A client entering the caseload; their course of sessions ends before `first_seen` (when we first post)."""
    tenant, site_id, clinician_id = clinician
    r = rng.random()
    trajectory: Trajectory
    if r < mix.declining:
        trajectory, start, slope = "declining", rng.uniform(36.5, 39.5), -rng.uniform(0.6, 1.5)
    elif r < mix.declining + mix.low_recovering:
        trajectory, start, slope = "low_recovering", rng.uniform(25.0, 33.0), rng.uniform(0.6, 1.5)
    else:
        trajectory, start, slope = "stable_high", rng.uniform(37.0, 39.5), 0.0
    f = rng.random()
    instrument = "CSRS" if f < mix.csrs else "GSRS" if f < mix.csrs + mix.gsrs else "SRS"
    course = rng.randint(*mix.course)
    # the whole course is history by the time it is posted: a site catching up, or an EHR export
    anchor = first_seen - timedelta(weeks=course, minutes=rng.randint(60, 3 * 24 * 60))
    client_id = f"cl-{run}-{slot + 1:05d}" + (f"-g{generation}" if generation else "")
    client = Client(slot, generation, tenant, site_id, clinician_id, client_id, trajectory, instrument,
                    rng.random() < mix.total_only, "ep-1" if rng.random() < mix.episodes else None, start, slope,
                    course, anchor)
    # Drawn after every SRS draw, from their own generator: the SRS stream of a seed stays the same.
    # Seeded by the seed and the client's place, never the run label (a fresh one per run by
    # default, which only names ids): a seed plans the same outcomes in every run.
    outcome_rng = random.Random(f"{seed}:{slot}:{generation}")
    return with_outcome(client, outcome_rng, mix) if mix.ors else client


def with_outcome(client: Client, rng: random.Random, mix: Mix) -> Client:
    """The client with an outcome trajectory drawn in correlation with their alliance trajectory."""
    r = rng.random()
    outcome: OutcomeTrajectory = "improver"
    for name, share in OUTCOME_SHARES[client.trajectory]:
        if r < share:
            outcome = name
            break
        r -= share
    # Intake ORS totals of people starting therapy sit mostly below the adult cutoff (25).
    start = min(30.0, max(6.0, rng.gauss(19.0, 4.0)))
    slope, course = {
        "improver": (rng.uniform(1.2, 2.5), client.course),
        "non_responder": (rng.uniform(-0.3, 0.4), client.course),
        "deteriorator": (-rng.uniform(0.8, 1.6), client.course),
        "dropout": (rng.uniform(-0.5, 0.3), min(client.course, rng.randint(1, 4))),
    }[outcome]
    child = OUTCOME_OF[Instrument(client.instrument)] != "ORS"
    age = rng.randint(6, 12) if child else rng.randint(13, 17) if rng.random() < mix.adolescents else \
        rng.randint(18, 75)
    return replace(client, outcome=outcome, ors_start=start, ors_slope=slope, course=course, client_age=age)


Roster = Sequence[tuple[str, str]]  # (clinician_id, site_id)


def build_network(tenants: int, sites: int, clinicians: int, clients: int, rng: random.Random, run: str,
                  mix: Mix = Mix(), now: datetime = DEFAULT_NOW, roster: Roster | None = None,
                  seed: int = 0) -> Network:
    """Spread sites over tenants, clinicians over sites, clients over clinicians (round-robin).

    A `roster` names the clinicians and their sites instead (e.g. to match clinicians registered
    in alerts); its sites are spread over tenants in order of appearance.
    """
    tenants = max(1, tenants)
    clients = max(clients, 1)
    if roster:
        names = list(dict.fromkeys(site for _, site in roster))
        tenant_of = {site: i % tenants for i, site in enumerate(names)}
        site_list = tuple((tenant_of[site], site) for site in names)
        clin_list = tuple((tenant_of[site], site, clinician) for clinician, site in roster)
        clinicians = len(clin_list)
    else:
        sites = max(sites, tenants)
        clinicians = max(clinicians, sites)
        site_list = tuple((i % tenants, f"site-{i + 1}") for i in range(sites))
        clin_list = tuple((site_list[j % sites][0], site_list[j % sites][1], f"clin-{j + 1}")
                          for j in range(clinicians))
    first = tuple(new_client(k, 0, clin_list[k % clinicians], rng, run, mix, now, seed) for k in range(clients))
    return Network(tenants, site_list, clin_list, first)


def _round1(x: float) -> float:
    return float(f"{x:.1f}")


def rating(client: Client, session_number: int, rng: random.Random) -> dict[str, float]:
    """The items (or total) a client gives at one session, following their trajectory."""
    expected = client.start_total + client.slope * (session_number - 1)
    noise = 0.5 if client.trajectory == "stable_high" else 0.8
    total = min(40.0, max(12.0, expected + rng.gauss(0.0, noise)))
    if client.trajectory == "stable_high":
        total = max(total, 35.0)
    items = [min(10.0, max(0.0, _round1(total / 4 + rng.gauss(0.0, 0.25)))) for _ in ITEMS]
    if client.total_only:
        return {"total": _round1(sum(items))}
    return dict(zip(ITEMS, items, strict=True))


def ors_rating(client: Client, session_number: int, rng: random.Random) -> dict[str, float]:
    """The ORS items (or total) a client gives at the start of one session, following their outcome
    trajectory: improvement levels off towards the top of the scale, deterioration towards its floor."""
    expected = client.ors_start + client.ors_slope * (session_number - 1)
    total = min(36.0, max(3.0, expected + rng.gauss(0.0, 1.5)))
    items = [min(10.0, max(0.0, _round1(total / 4 + rng.gauss(0.0, 0.6)))) for _ in ORS_ITEM_NAMES]
    if client.total_only:
        return {"total": _round1(sum(items))}
    return dict(zip(ORS_ITEM_NAMES, items, strict=True))


def iter_plan(tenants: int, sites: int, clinicians: int, clients: int, count: int | None, seed: int = 0,
              run: str = "", now: datetime | None = None, rate: float | None = None,
              mix: Mix = Mix(), roster: Roster | None = None) -> Iterator[PlannedSubmission]:
    """`_iter_plan`, cut at `count` (an ORS opening a session may take the last place: its SRS then
    falls outside the run, like a session still under way when it ends)."""
    stream = _iter_plan(tenants, sites, clinicians, clients, count, seed, run, now, rate, mix, roster)
    return stream if count is None else islice(stream, count)


def _iter_plan(tenants: int, sites: int, clinicians: int, clients: int, count: int | None, seed: int = 0,
               run: str = "", now: datetime | None = None, rate: float | None = None,
               mix: Mix = Mix(), roster: Roster | None = None) -> Iterator[PlannedSubmission]:
    """The run in send order: `count` submissions (retries, late and invalid ones included), or endless.
    With `mix.ors` each session's ORS comes right before its SRS (in the same batch, or held back
    with it when the session is late), and counts as a submission of its own.

    The same arguments always give the same stream. `now` is when sending starts and `rate` the
    offered rate: a client who enters the caseload when the stream is at position p has a course
    of weekly sessions that ends before `now + p / rate`, so every valid timestamp is in the past
    when it is posted.
    """
    rng = random.Random(seed)
    run = run or f"s{seed}"
    start = now or DEFAULT_NOW
    net = build_network(tenants, sites, clinicians, clients, rng, run, mix, start, roster, seed)
    active = list(net.clients)
    next_session = [1] * len(active)
    by_tenant: dict[int, list[int]] = {}
    for c in active:
        by_tenant.setdefault(c.tenant, []).append(c.slot)
    tenants_with_clients = sorted(by_tenant)
    recent: deque[PlannedSubmission] = deque(maxlen=300)  # what a retry may resend
    pending: list[tuple[int, PlannedSubmission]] = []  # (due position, an older session held back)
    in_batch: set[str] = set()
    companions: dict[str, PlannedSubmission] = {}  # SRS submission id -> the ORS that opens its session
    emitted = 0
    n_ids = 0
    batch_no = 0
    unbounded = 1 << 62

    def posted_at(pos: int) -> datetime:
        return start + timedelta(seconds=pos / rate) if rate else start

    def take_session(slot: int) -> tuple[Client, int]:
        client, n = active[slot], next_session[slot]
        next_session[slot] += 1
        if next_session[slot] > client.course:  # discharged: the slot goes to a new client
            active[slot] = new_client(slot, client.generation + 1, (client.tenant, client.site_id,
                                                                    client.clinician_id),
                                      rng, run, mix, posted_at(emitted), seed)
            next_session[slot] = 1
        return client, n

    def make(client: Client, n: int, kind: Kind, batch: int | None, rule: str | None = None) -> PlannedSubmission:
        nonlocal n_ids
        n_ids += 1
        sid = f"sim-{run}-{n_ids:07d}"
        body = _body(client, sid, n, rating(client, n, rng))
        if rule is not None:
            body = _break(body, rule, posted_at(emitted), rng)
        elif mix.ors:
            companions[sid] = PlannedSubmission(-1, client.tenant, kind, _ors_body(client, f"{sid}-o", n, rng),
                                                batch, client.slot, n, None, client.trajectory, client.outcome)
        return PlannedSubmission(-1, client.tenant, kind, body, batch, client.slot, n, rule, client.trajectory,
                                 client.outcome)

    def one(tenant: int | None, batch: int | None, room: int) -> PlannedSubmission:
        """One lottery draw: a new session, a retry, a late pair, or an invalid body."""
        slot = rng.choice(by_tenant[tenant]) if tenant is not None else rng.randrange(len(active))
        client = active[slot]
        r = rng.random()
        if r < mix.invalid:  # an invalid body does not use up a session number
            return make(client, next_session[slot], "invalid", batch, rng.choice(INVALID_RULES))
        r -= mix.invalid
        if r < mix.duplicate:
            # a retry of something sent in an earlier request (same tenant, same body)
            earlier = [p for p in recent if (batch is None or p.batch != batch) and p.submission_id not in in_batch
                       and (tenant is None or p.tenant == tenant)]
            if earlier:
                return replace(rng.choice(earlier), kind="duplicate", batch=batch)
        r -= mix.duplicate
        if r < mix.late and room >= 2:
            # the newer session goes now, the older one a few submissions later; a client in their
            # last session cannot have a pair, so pick another one
            pool = by_tenant[tenant] if tenant is not None else range(len(active))
            for _ in range(10):
                if next_session[slot] < active[slot].course:
                    break
                slot = rng.choice(pool)
            else:
                return make(*take_session(slot), "new", batch)
            older = make(*take_session(slot), "late", None)
            newer = make(*take_session(slot), "new", batch)
            pending.append((emitted + rng.randint(3, 25), older))
            return newer
        return make(*take_session(slot), "new", batch)

    def emit_one(p: PlannedSubmission) -> PlannedSubmission:
        nonlocal emitted
        p = replace(p, seq=emitted)
        emitted += 1
        if p.valid:
            recent.append(p)
        return p

    def emit(p: PlannedSubmission) -> Iterator[PlannedSubmission]:
        """The submission, after the ORS of its session when it opens one (a retry resends just itself)."""
        opening = companions.pop(p.submission_id, None) if p.kind != "duplicate" else None
        if opening is not None:
            yield emit_one(replace(opening, batch=p.batch))
        yield emit_one(p)

    def room() -> int:
        return unbounded if count is None else count - emitted - len(pending)

    while room() > 0:
        due = next((p for p in pending if p[0] <= emitted), None)
        if due is not None:
            pending.remove(due)
            yield from emit(due[1])
            continue
        if rng.random() < mix.batch_steps and room() > 1:
            batch_no += 1
            tenant = rng.choice(tenants_with_clients)
            size = min(room(), rng.randint(*mix.batch_size))
            in_batch.clear()
            target = room() - size
            while room() > target:
                p = one(tenant, batch_no, room())
                in_batch.add(p.submission_id)
                in_batch.add(f"{p.submission_id}-o")
                yield from emit(p)
        else:
            yield from emit(one(None, None, room()))
    for _, p in sorted(pending, key=lambda d: d[0]):
        yield from emit(p)


def plan(tenants: int, sites: int, clinicians: int, clients: int, count: int, seed: int = 0, run: str = "",
         now: datetime | None = None, rate: float | None = None, mix: Mix = Mix(),
         roster: Roster | None = None) -> list[PlannedSubmission]:
    """`iter_plan` as a list of exactly `count` submissions."""
    return list(iter_plan(tenants, sites, clinicians, clients, count, seed, run, now, rate, mix, roster))


def _body(client: Client, submission_id: str, session_number: int, rating: dict[str, float]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "submission_id": submission_id,
        "instrument": client.instrument,
        "client_id": client.client_id,
        "clinician_id": client.clinician_id,
        "site_id": client.site_id,
        "session_number": session_number,
        "administered_at": client.administered_at(session_number),
    }
    if client.episode_id is not None:
        body["episode_id"] = client.episode_id
    if "total" in rating:
        body["total"] = rating["total"]
    else:
        body["items"] = dict(rating)
    return body


def _ors_body(client: Client, submission_id: str, session_number: int, rng: random.Random) -> dict[str, Any]:
    """The ORS-family form that opens a session (CORS for a child), before the session's SRS."""
    body = _body(client, submission_id, session_number, ors_rating(client, session_number, rng))
    body.update(instrument=OUTCOME_OF[Instrument(client.instrument)].value,
                administered_at=client.ors_administered_at(session_number))
    if client.client_age is not None:
        body["client_age"] = client.client_age
    return body


def _break(body: dict[str, Any], rule: str, now: datetime, rng: random.Random) -> dict[str, Any]:
    """Make a valid body invalid in one specific way."""
    b: dict[str, Any] = json.loads(json.dumps(body))
    items = b.get("items") or {"relationship": 9.0, "goals": 9.0, "approach": 9.0, "overall": 9.0}
    if rule == "item_out_of_range":
        b.pop("total", None)
        b["items"] = {**items, rng.choice(ITEMS): rng.choice([10.5, 11.0, -0.5, 42.0])}
    elif rule == "item_two_decimals":
        b.pop("total", None)
        b["items"] = {**items, rng.choice(ITEMS): rng.choice([8.25, 9.15, 7.05])}
    elif rule == "items_and_total":
        b["items"] = items
        b["total"] = _round1(sum(items.values()))
    elif rule == "neither_items_nor_total":
        b.pop("items", None)
        b.pop("total", None)
    elif rule == "partial_items":
        b.pop("total", None)
        partial = dict(items)
        del partial[rng.choice(ITEMS)]
        b["items"] = partial
    elif rule == "unknown_instrument":
        b["instrument"] = rng.choice(["XSRS", "OQ45", "srs-long"])
    elif rule == "session_number_zero":
        b["session_number"] = rng.choice([0, -1])
    elif rule == "timestamp_without_offset":
        b["administered_at"] = datetime.fromisoformat(b["administered_at"]).replace(tzinfo=None).isoformat()
    elif rule == "timestamp_in_future":
        b["administered_at"] = (now + timedelta(days=rng.choice([3, 10, 400]))).isoformat()
    elif rule == "bad_submission_id":
        b["submission_id"] = rng.choice(["has space", "x" * 129, "semi;colon", "slash/id"])
    elif rule == "unknown_field":
        b["mood"] = "fine"
    elif rule == "empty_client_id":
        b["client_id"] = ""
    else:  # pragma: no cover - every rule above is listed in INVALID_RULES
        raise ValueError(rule)
    return b


def requests(planned: Iterable[PlannedSubmission]) -> Iterator[list[PlannedSubmission]]:
    """Group a plan into HTTP requests: a single post, or consecutive members of one batch."""
    group: list[PlannedSubmission] = []
    for p in planned:
        if group and (p.batch is None or group[0].batch != p.batch):
            yield group
            group = []
        group.append(p)
    if group:
        yield group


# ---------------------------------------------------------------------------------------------- sending

Outcome = Literal["accepted", "rejected"]
# (submission, outcome, status, answered at, first attempt started at), times from time.time()
ResultHook = Callable[[PlannedSubmission, Outcome, str, float, float], None]


@dataclass
class SendStats:
    """What intake answered, per planned submission."""

    planned: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by HTTP status (or "422" for batch items)
    duplicates: int = 0
    late: int = 0
    invalid: int = 0
    ors: int = 0  # outcome ratings among the sent (`Mix.ors`)
    retried: int = 0  # requests re-sent after 429/503 (same submission ids)
    unexpected: int = 0  # a valid submission rejected, or an invalid one accepted
    behind_seconds: float = 0.0  # how far the sender fell behind its schedule at worst
    elapsed: float = 0.0
    track_ids: bool = True
    accepted_ids: set[str] = field(default_factory=set)  # only with track_ids (it grows with the run)

    def as_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned, "sent": self.sent, "accepted": self.accepted,
            "rejected": dict(sorted(self.rejected.items())), "duplicates": self.duplicates, "late": self.late,
            "invalid": self.invalid, "ors": self.ors, "retried": self.retried, "unexpected": self.unexpected,
            "behind_seconds": round(self.behind_seconds, 3), "elapsed_seconds": round(self.elapsed, 2),
            "offered_rate": round(self.sent / self.elapsed, 1) if self.elapsed else 0.0,
        }


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(5.0, max(0.05, float(resp.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


async def _post(client: httpx.AsyncClient, key: str, group: list[PlannedSubmission], stats: SendStats,
                on_result: ResultHook | None, deadline: float) -> None:
    """Post one request; retry 429/503 with the same ids (as a well-behaved site would)."""
    headers = {"Authorization": f"Bearer {key}"}
    batch = group[0].batch is not None
    attempt = 0
    started = time.time()
    while True:
        status: str
        results: list[tuple[Outcome, str]]
        try:
            if batch:
                resp = await client.post("/v1/submissions/batch", json={"submissions": [p.body for p in group]},
                                         headers=headers)
            else:
                resp = await client.post("/v1/submissions", json=group[0].body, headers=headers)
            status = str(resp.status_code)
        except httpx.HTTPError as exc:
            resp = None
            status = type(exc).__name__
        if resp is not None and resp.status_code in (429, 503) and attempt < 3 and time.monotonic() < deadline:
            attempt += 1
            stats.retried += 1
            await asyncio.sleep(_retry_after(resp))
            continue
        break
    at = time.time()
    if resp is not None and batch and resp.status_code == 200:
        by_index = {int(r["index"]): r for r in resp.json().get("results", [])}
        results = [("accepted", "200") if by_index.get(i, {}).get("status") == "accepted" else ("rejected", "422")
                   for i in range(len(group))]
    elif resp is not None and resp.status_code in (200, 202):
        results = [("accepted", status)] * len(group)
    else:
        results = [("rejected", status)] * len(group)
    for p, (outcome, st) in zip(group, results, strict=True):
        stats.sent += 1
        stats.duplicates += p.kind == "duplicate"
        stats.late += p.kind == "late"
        stats.invalid += p.kind == "invalid"
        stats.ors += p.ors
        if outcome == "accepted":
            stats.accepted += 1
            if stats.track_ids:
                stats.accepted_ids.add(p.submission_id)
        else:
            stats.rejected[st] += 1
        if (outcome == "accepted") != p.valid:
            stats.unexpected += 1
        if on_result is not None:
            on_result(p, outcome, st, at, started)


async def send(planned: Iterable[PlannedSubmission], url: str, keys: Sequence[str], rate: float, duration: float,
               on_result: ResultHook | None = None, on_tick: Callable[[SendStats], None] | None = None,
               concurrency: int = 64, grace: float = 15.0, transport: httpx.AsyncBaseTransport | None = None,
               total: int | None = None, track_ids: bool = True) -> SendStats:
    """Post a plan at `rate` submissions/s for at most `duration` seconds; wait up to `grace` for answers."""
    if not keys:
        raise ValueError("no submit keys")
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if total is None:
        total = len(planned) if isinstance(planned, Sequence) else 0
    stats = SendStats(planned=total, track_ids=track_ids)
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    # Not one pool of `concurrency` connections: httpcore's pool walks every connection it holds on
    # each request's start and end, polling each idle socket (quadratic in the connections: known
    # upstream, encode/httpcore#1035, pydantic/httpx2#974). Once intake slowed for a moment and the
    # pool had grown to its 64 connections, that walk took most of the generator's CPU (py-spy of
    # `alliance bench`, 2026-11-27: 85% of the bench process's samples in the POSTs, 42% in
    # `_assign_requests_to_connections`), its event loop lagged (p50 59 ms, p99 183 ms), and every
    # later POST was timed late: the instrument fed its own slowness. Small pools, each request on
    # the least busy one, keep each walk short; the bound on requests in flight is unchanged.
    shards = 1 if transport is not None else max(1, -(-concurrency // POOL_CONNECTIONS))
    per_pool = -(-concurrency // shards)
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    async with contextlib.AsyncExitStack() as pools:
        clients = [await pools.enter_async_context(httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(30.0), limits=limits, transport=transport)) for _ in range(shards)]
        busy = [0] * shards
        start = time.monotonic()
        stop_at = start + duration
        done = 0
        for group in requests(planned):
            due = start + done / rate
            if due >= stop_at:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                stats.behind_seconds = max(stats.behind_seconds, -delay)
            await sem.acquire()
            key = keys[group[0].tenant % len(keys)]

            pool = min(range(shards), key=busy.__getitem__)
            busy[pool] += 1

            async def run(g: list[PlannedSubmission] = group, k: str = key, pool: int = pool) -> None:
                try:
                    await _post(clients[pool], k, g, stats, on_result, stop_at + grace)
                finally:
                    busy[pool] -= 1
                    sem.release()

            task = asyncio.create_task(run())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            done += len(group)
            if on_tick is not None:
                on_tick(stats)
        if tasks:
            _, late_tasks = await asyncio.wait(set(tasks), timeout=grace)
            for t in late_tasks:
                t.cancel()
        stats.elapsed = time.monotonic() - start
    return stats


async def run_simulation(tenants: int, sites: int, clinicians: int, clients: int, rate: float, duration: float,
                         url: str, keys: Sequence[str], seed: int = 0, run: str = "", quiet: bool = True,
                         keep: bool = False, console: Console | None = None, roster: Roster | None = None,
                         ors: bool = False) -> tuple[list[PlannedSubmission], SendStats]:
    """Plan and post one simulation (with `ors`, each session's ORS before its SRS); returns the plan
    (only with `keep`) and the counts.

    Without `keep` the plan is streamed and accepted ids are not kept, so memory stays flat however
    long the run.
    """
    count = max(1, int(rate * duration))
    stream = iter_plan(tenants, sites, clinicians, clients, count, seed=seed, run=run or secrets.token_hex(3),
                       now=datetime.now(UTC), rate=rate, roster=roster, mix=Mix(ors=ors))
    planned: list[PlannedSubmission] = list(stream) if keep else []
    source: Iterable[PlannedSubmission] = planned if keep else stream
    if quiet:
        return planned, await send(source, url, keys, rate, duration, total=count, track_ids=keep)
    console = console or Console(stderr=True)
    columns = (TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    live: list[SendStats] = []

    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=count)

        def show(s: SendStats) -> None:
            progress.update(task, completed=s.sent, description=(
                f"accepted {s.accepted}  rejected {sum(s.rejected.values())}  dup {s.duplicates}  late {s.late}"
                f"  retried {s.retried}"))

        def on_tick(s: SendStats) -> None:
            if not live:
                live.append(s)

        async def ticker() -> None:
            while True:  # answers arrive between sends, so refresh on a clock too
                await asyncio.sleep(0.25)
                if live:
                    show(live[0])

        ticking = asyncio.create_task(ticker())
        try:
            stats = await send(source, url, keys, rate, duration, on_tick=on_tick, total=count, track_ids=keep)
        finally:
            ticking.cancel()
        show(stats)
    return planned, stats


def summary_table(stats: SendStats) -> Table:
    """The counts as a table."""
    t = Table(title="simulation", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in stats.as_dict().items():
        if k == "rejected":
            for status, n in v.items():
                t.add_row(f"rejected ({status})", str(n))
            t.add_row("rejected (all)", str(sum(v.values())))
        else:
            t.add_row(k, str(v))
    return t


async def _create_keys(tenants: int) -> list[str]:
    from shared import auth
    from shared.mongo import database, make_client
    from shared.settings import MongoSettings

    settings = MongoSettings()
    client = make_client(settings, admin=True)
    try:
        db = database(client, settings)
        return [(await auth.create_key(db, f"sim-{i + 1}", "submit", None, "alliance simulate"))[0]
                for i in range(tenants)]
    finally:
        await client.close()


def simulate(
    tenants: Annotated[int, typer.Option(help="tenants (one submit key each)", min=1)] = 1,
    sites: Annotated[int, typer.Option(help="sites in the whole network", min=1)] = 3,
    clinicians: Annotated[int, typer.Option(help="clinicians in the whole network", min=1)] = 6,
    clients: Annotated[int, typer.Option(help="clients in the whole network", min=1)] = 60,
    rate: Annotated[float, typer.Option(help="offered submissions per second", min=0.01)] = 5.0,
    duration: Annotated[float, typer.Option(help="seconds to run; stops by itself", min=0.1)] = 60.0,
    url: Annotated[str, typer.Option(help="intake base URL")] = "http://127.0.0.1:8001",
    keys: Annotated[str, typer.Option(help="comma-separated submit keys, one per tenant",
                                      envvar="ALLIANCE_SIM_KEYS")] = "",
    seed: Annotated[int, typer.Option(help="random seed (same seed and run: same plan)")] = 0,
    run: Annotated[str, typer.Option(help="id prefix for clients and submissions; random by default")] = "",
    roster: Annotated[str, typer.Option(help="name the clinicians and their sites instead of --sites/--clinicians:"
                                             " CLINICIAN@SITE,... (e.g. c-1@north,c-2@north,c-3@south)")] = "",
    create_keys: Annotated[bool, typer.Option(help="create one submit key per tenant in the configured "
                                                    "MongoDB (ALLIANCE_MONGO_*) when --keys is empty")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress display; print the counts as one JSON line")] = False,
    ors: Annotated[bool, typer.Option(help="open each session with its ORS (CORS for children), as in PCOMS; "
                                           "--no-ors posts the SRS alone")] = True,
) -> SendStats:
    """Post a synthetic clinic network's ratings (each session's ORS, then its SRS) to intake at a fixed
    rate, then print the counts."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,24}", run):
        raise typer.BadParameter("up to 24 of [A-Za-z0-9._-]", param_hint="--run")
    pairs: list[tuple[str, str]] = []
    for entry in (e.strip() for e in roster.split(",") if e.strip()):
        clinician, sep, site = entry.partition("@")
        if not (sep and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", clinician)
                and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", site)):
            raise typer.BadParameter(f"{entry!r}: want CLINICIAN@SITE", param_hint="--roster")
        pairs.append((clinician, site))
    key_list = [k.strip() for k in keys.split(",") if k.strip()]
    if not key_list and create_keys:
        key_list = asyncio.run(_create_keys(tenants))
    if not key_list:
        raise typer.BadParameter("give submit keys (--keys or ALLIANCE_SIM_KEYS; create them with "
                                 "`alliance keys create --tenant T --role submit`) or pass --create-keys",
                                 param_hint="--keys")
    if len(key_list) < tenants and not quiet:
        Console(stderr=True).print(f"[yellow]{len(key_list)} keys for {tenants} tenants: tenants share keys")
    _, stats = asyncio.run(run_simulation(tenants, sites, clinicians, clients, rate, duration, url, key_list,
                                          seed=seed, run=run, quiet=quiet, roster=pairs or None, ors=ors))
    if quiet:
        typer.echo(json.dumps(stats.as_dict()))
    else:
        Console().print(summary_table(stats))
    return stats


def main(argv: list[str] | None = None) -> None:
    """`python -m tools.simulate`."""
    run_command(simulate, argv, "simulate")


if __name__ == "__main__":
    main()


