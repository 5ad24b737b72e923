"""The delivery worker: sends due deliveries from the durable schedule in MongoDB.

Why a schedule in MongoDB and not a retry topic
-----------------------------------------------
The consumer only *records* what must be sent (one `deliveries` document per (alert or event,
recipient, channel), `_id` = the deterministic delivery id, status `pending`, due now) and
commits. Sending happens here, outside the consumer, so a slow or failing receiver never holds
up a partition or other receivers. Retries are just `next_attempt_at` in the future on the same
document: exponential backoff with jitter (default 1 s doubling to 5 min, 8 attempts), no extra
topic, no re-consumption, and the state of every delivery (attempts, last error, failed) can be
queried through the API. After the last attempt the delivery becomes `failed` and a DeadLetter
goes to `srs.deadletter.v1` (and a clinician's delivery of an alert tells `failed` on the alert's
status topic: see the last section).

Claiming (two alerts processes never send the same delivery at the same time)
------------------------------------------------------------------------------
A delivery is attempted only by the worker that holds its lease: `claimed_until = now + lease`, a
claim token and `claimed_by` (the worker's `instance`) on the document. A worker takes only what is
due and not leased (`claimed_until <= now`), so no other process's worker sees a leased document as
due. The lease (default 30 s) outlasts one attempt (timeout 5 s) plus recording it. Up to
`concurrency` attempts run at once, each with its own timeout, so one slow receiver occupies one
slot, not the worker. A lease is taken in one of two ways.

At insert (`hand_off`: the deliveries this process's consumer schedules). Before the insert, the
worker picks of the new deliveries what its free slots and each tenant's share allow
(`rules.fair_pick`, as a claim would), writes its lease into those documents and counts their
slots as taken; the insert (one round trip) stores them leased and the rest unleased
(`claimed_until` EPOCH). It then attempts only the leased documents the insert really inserted:
one whose id existed already (a redelivered event) is not attempted here, the stored one being
claimed as ever; and if anything was inserted unleased it wakes itself to claim it. So a new
delivery costs the insert and the record of its attempt: no read, no claim. It leases at insert
only when a claim now would read no other candidate it knows of (its last claim left nothing due
behind, no claim is in flight, no wake is pending: a finished attempt, a retry timer, a new
delivery): otherwise everything is inserted unleased and claimed, so new deliveries never overtake
ones this worker knows are waiting. (Those another process inserted since its last claim it sees
at its next claim or poll, as before.) Escalations, reroutes, and the deliveries the status teller
or the API schedules again are stored unleased and wake the worker.
What a crash leaves: before the insert, nothing (the consumer has not committed; the event is
consumed again). After the insert, the leased deliveries pending under a lease that ends within
`lease_seconds`; then they are due, and another process's worker (or this one after a restart,
which claims before it leases at insert) claims and sends them. An insert that fails
leaves the same: what it stored leased is claimed once the lease ends, and the consumer retries the
batch as with any failed store write.

By a claim (everything else, and whenever leasing at insert did not apply). A conditional
`update_many` (see `AlertsStore.claim`) sets the lease on the due candidates the worker read and
picked, and the update of each document is atomic, so of two workers racing for one delivery
exactly one gets it. The candidates are read whole, so a claim that got every delivery it picked
(the update changed them all) hands out what it read: two round trips per claim, a third only when
another worker won some or one was read under an ended lease (its holder may still record the
attempt it made). A crash after the claim leaves the same as one after a leased insert.

Sharing the slots between tenants
---------------------------------
One first-come schedule let a tenant with many slow endpoints fill every slot with attempts that
time out, and everyone else's clinical alerts waited behind them. Each claim now reads the oldest
due candidates of the tenants not already at their share (so one tenant's backlog cannot fill the
candidates) and takes, tenants taking turns, at most each tenant's share (`rules.fair_pick`): an
equal split of the slots between the tenants with work, capped at `tenant_concurrency` (a quarter
of the slots by default), so a tenant alone never holds every slot and a newcomer's delivery finds
a free one at once. A lease at insert takes the same turns and shares over the new deliveries, its
slots counted as in flight from before the insert, so a claim meanwhile sees them taken.

Outcomes are written in batches (whatever finished while the previous write was in flight), and a
claim happens only when something is due: deliveries stored unleased (whoever stored them wakes
the worker), a retry timer, a slot freed while work was waiting, or the poll interval.

The window between sending and recording, and what a receiver sees
------------------------------------------------------------------
The effect is "exactly once" per delivery id in our records: the unique `_id` means a replayed
event can never create a second delivery, and a delivery marked `delivered` is never sent again.
The one window left is between a receiver's 2xx and our write of `delivered`: if the process
dies (or the store is unreachable) in that window, the lease expires and another attempt sends
the same delivery again. In that worst case a receiver sees the same `webhook-id` (and
`X-Alliance-Delivery`; for email the same Message-ID) twice; the Standard Webhooks contract is that
receivers dedupe on `webhook-id`. The window cannot be closed without the receiver's help
(a two-phase protocol), so we keep it to a single store write after the response.

What is told of a clinician's delivery, and a crash around it
--------------------------------------------------------------
A clinician's delivery of an alert (webhook or email; not a partner's, a supervisor's or a
withdrawal notice) also owes a status event when it ends: `delivered`, or `failed` once its
attempts are used up; and any delivery of an alert to a person it was routed to (its clinician or a
site fallback, `rules.to_person`) may be the last of its revision's to fail, when the revision
reached nobody and is told `failed` without a channel (`rules.revision_reached`). The write that
records the outcome first stores the delivery's entry in `delivery_outbox` (one ordered command
with the outcome); only after that write are the ids handed to the `StatusTeller`
(services/alerts/statuses.py; the documents as written instead, when every update of the write
matched, so it reads nothing back), which publishes on the alert's status topic and then deletes
the entry. A crash before the write loses nothing (the attempt is made again, as above); a crash
between the entry and the outcome leaves an entry the sweep drops (the delivery is attempted
again and its outcome writes it again); a crash after the write leaves the entry, and the
teller's sweep publishes the status later under the same derived event id. So the status of a
recorded outcome is never lost, and at worst published twice as one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from services.alerts import metrics
from services.alerts.rules import (
    NEEDS_OPERATOR,
    Outcome,
    backoff_seconds,
    fair_pick,
    is_final,
    tenants_at_share,
    to_person,
)
from services.alerts.senders import Cancelled, SendError
from services.alerts.settings import AlertsSettings
from services.alerts.store import EPOCH, OWED_AT, AlertsStore, AttemptResult, utcnow
from shared import ids, tracing
from shared.events import DeadLetter, DeadLetterReason
from shared.kafka import OutboundRecord, Publisher
from shared.metrics import DEADLETTER
from shared.mongo import Document
from shared.topics import Topics

log = logging.getLogger("alliance.alerts.worker")

SERVICE = "alerts"
DELIVERY_FAILED = DeadLetterReason.DELIVERY_FAILED


class Sender(Protocol):
    async def send(self, d: Document) -> int: ...


def dead_letter(d: Document, attempts: int, error: str, dlq_topic: str) -> OutboundRecord:
    """The DeadLetter of a delivery that exhausted its attempts (no client data outside `payload`)."""
    source = d.get("source") or {}
    detail = (f"delivery {d['_id']} to {d['recipient']} by {d['channel']} failed after {attempts} "
              f"attempts; last error: {error}")
    dl = DeadLetter(
        event_id=ids.delivery_dead_letter_event_id(SERVICE, DELIVERY_FAILED, d["_id"]),
        tenant_id=d.get("tenant_id"),
        occurred_at=datetime.now(UTC),
        service=SERVICE,
        reason=DELIVERY_FAILED,
        detail=detail[:2000],
        source_topic=source.get("topic") or str(d.get("topic", "")),
        source_partition=source.get("partition"),
        source_offset=source.get("offset"),
        key=source.get("key"),
        payload=str(d.get("body", "")),
    )
    DEADLETTER.labels(SERVICE, DELIVERY_FAILED).inc()
    key = source.get("key")
    return OutboundRecord(dlq_topic, dl.model_dump_json().encode(), key=key.encode() if key else None,
                          correlation_id=d.get("correlation_id"), traceparent=d.get("traceparent"))


def recorded_doc(claimed: Document, r: AttemptResult, at: datetime) -> Document:
    """A claimed delivery as `AlertsStore.record` wrote `r` into it at `at` (ended: delivered or failed),
    with the time of its outbox entry (`OWED_AT`: the same)."""
    done: Document = {"status": r.outcome, "attempts": r.attempts, "finished_at": at, "last_outcome": r.last_outcome,
                      "response_status": r.response_status, "last_error": r.error, "claimed_until": EPOCH,
                      OWED_AT: at}
    if r.outcome == "delivered":
        done["delivered_at"] = at
    return {**claimed, **done}


def _instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(eq=False)
class DeliveryWorker:
    """Claims due deliveries and attempts them, concurrently and with bounded parallelism."""

    store: AlertsStore
    senders: dict[str, Sender]
    publisher: Publisher
    topics: Topics
    settings: AlertsSettings
    jitter: Callable[[], float] = random.random
    # Told the ids of the deliveries just recorded owing a `delivered` / `failed` status
    # (`StatusTeller.recorded`; see services/alerts/statuses.py) when what the store holds of them
    # is not known here, and their documents as recorded when it is (`StatusTeller.recorded_docs`).
    on_statuses_owed: Callable[[list[str]], None] = lambda _ids: None
    on_statuses_recorded: Callable[[list[Document]], None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _tenant_of: dict[asyncio.Task[None], str] = field(default_factory=dict, init=False)
    # In-flight attempts per tenant (what `fair_pick` subtracts from each share), and the
    # most any tenant has had at once (for tests and the bench: fairness is structural).
    inflight_by_tenant: Counter[str] = field(default_factory=Counter, init=False)
    peak_by_tenant: Counter[str] = field(default_factory=Counter, init=False)
    _saturated: bool = field(default=False, init=False)
    _results: asyncio.Queue[AttemptResult | None] = field(default_factory=asyncio.Queue, init=False)
    # The claimed documents of the attempts not yet recorded (what a recorded status is told from).
    _claimed: dict[str, Document] = field(default_factory=dict, init=False)
    # Recorded on each claim, so operators (and tests) can tell which process holds a lease.
    instance: str = field(default_factory=_instance_name, init=False)
    # Slots held for deliveries being inserted already leased to this worker (`hand_off`); they
    # count in `inflight_by_tenant` too, so a claim meanwhile sees them as taken.
    _reserved: int = field(default=0, init=False)
    # Whether a hand-off may take slots: the loop is waiting with no wake pending, no claim in
    # flight, and its last claim left nothing due behind (see `_may_hand_off`).
    _running: bool = field(default=False, init=False)
    _claiming: bool = field(default=False, init=False)
    _left_behind: bool = field(default=True, init=False)

    def wake(self) -> None:
        """New deliveries are due now (called by the consumer after it recorded them)."""
        self._wake.set()

    def _free(self) -> int:
        return self.settings.concurrency - len(self._inflight) - self._reserved

    def _may_hand_off(self) -> bool:
        """Whether new deliveries may be leased at insert: only when a claim now would read no other
        candidates this worker knows of (its last claim left none behind, and no finished attempt,
        retry timer or wake is waiting for a claim that would read the store first). The hand-off's
        `fair_pick` over the new deliveries is then the claim's over the same candidates."""
        return self._running and not self._claiming and not self._left_behind and not self._wake.is_set()

    async def hand_off(self, docs: Sequence[Document],
                       insert: Callable[[Sequence[Document]], Awaitable[list[Document]]]) -> list[Document]:
        """Insert new deliveries (`insert` returns those it inserted), the ones the free slots and
        each tenant's share allow (`rules.fair_pick`) already leased to this worker, and start their
        attempts at once: no read and no claim. The rest are inserted unleased and the worker woken
        to claim them. A document whose id existed already is never attempted here (the stored one
        is claimed as ever). Returns what `insert` inserted."""
        unique = list({d["_id"]: d for d in docs}.values())
        leased = self._reserve(unique) if self._may_hand_off() else {}
        try:
            new = await insert([leased.get(str(d["_id"]), d) for d in unique])
        except BaseException:
            self._release(list(leased.values()))
            raise
        inserted = {str(d["_id"]) for d in new}
        if not self._running:  # stopping: the leases end and the deliveries are claimed then
            self._release(list(leased.values()))
        else:
            for d in leased.values():
                if str(d["_id"]) in inserted:
                    self._reserved -= 1
                    self._start(d)
                else:
                    self._release([d])
        if any(str(d["_id"]) not in leased for d in new):
            self._left_behind = True
            self.wake()
        return new

    def _reserve(self, docs: list[Document]) -> dict[str, Document]:
        """Lease what `fair_pick` gives of `docs` now (in memory: the insert writes the lease)."""
        concurrency, cap = self.settings.concurrency, self.settings.tenant_concurrency
        tenant_of = {str(d["_id"]): str(d.get("tenant_id")) for d in docs}
        picked = fair_pick(list(tenant_of.items()), self.inflight_by_tenant, self._free(), concurrency, cap)
        lease = {"claimed_until": utcnow() + timedelta(seconds=self.settings.lease_seconds),
                 "claim": uuid.uuid4().hex, "claimed_by": self.instance}
        by_id = {str(d["_id"]): d for d in docs}
        for i in picked:
            self._reserved += 1
            self._track(tenant_of[i])
        return {i: {**by_id[i], **lease} for i in picked}

    def _release(self, leased: list[Document]) -> None:
        for d in leased:
            self._reserved -= 1
            self._untrack(str(d.get("tenant_id")))

    def _track(self, tenant: str) -> None:
        self.inflight_by_tenant[tenant] += 1
        self.peak_by_tenant[tenant] = max(self.peak_by_tenant[tenant], self.inflight_by_tenant[tenant])

    def _untrack(self, tenant: str) -> None:
        self.inflight_by_tenant[tenant] -= 1
        if self.inflight_by_tenant[tenant] <= 0:
            del self.inflight_by_tenant[tenant]
        if self._saturated:
            self._wake.set()  # a slot is free and more may be due

    def _start(self, d: Document) -> None:
        """Attempt a delivery leased to this worker; its slot is already counted (`_track`)."""
        self._claimed[str(d["_id"])] = d
        task = asyncio.create_task(self._attempt(d), name=f"delivery-{d['_id']}")
        self._inflight.add(task)
        self._tenant_of[task] = str(d.get("tenant_id"))
        task.add_done_callback(self._done)

    async def run(self) -> None:
        """Loop until cancelled: claim what is due and free slots allow, start attempts, wait."""
        lease = timedelta(seconds=self.settings.lease_seconds)
        recorder = asyncio.create_task(self._recorder(), name="delivery-recorder")
        self._running = True
        try:
            while True:
                self._wake.clear()
                free = self._free()
                # Until the claim below has decided, every finished attempt must wake the loop: one
                # that finishes while the claim is in flight would otherwise go unheard (the claim
                # left its tenant out, at its share, and nothing else may ever wake the loop).
                self._saturated = True
                if free > 0:
                    self._claiming = True
                    try:
                        claimed, more, left_behind = await self._claim(free, lease)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.warning("claiming deliveries failed (store unavailable?): %r", exc)
                        claimed, more, left_behind = [], False, True
                    finally:
                        self._claiming = False
                    self._left_behind = left_behind
                    for d in claimed:
                        self._track(str(d.get("tenant_id")))
                        self._start(d)
                    # Every slot taken, or some tenant may have more due than it got: a freed slot
                    # should claim again.
                    self._saturated = more or self._free() <= 0
                    if more and claimed and self._free() > 0:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
        finally:
            self._running = False
            for t in list(self._inflight):
                t.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            # Let the recorder write what finished (a lost outcome means a duplicate send later).
            self._results.put_nowait(None)
            try:
                await asyncio.wait_for(recorder, 5.0)
            except (TimeoutError, asyncio.CancelledError, Exception) as exc:
                log.warning("delivery outcomes not recorded at shutdown: %r", exc)

    async def _claim(self, free: int, lease: timedelta) -> tuple[list[Document], bool, bool]:
        """Claim up to `free` due deliveries, shared between tenants (`rules.fair_pick`); also
        whether more may be due (the candidates filled their window, or some were left for a
        tenant's share, or a tenant was left out for holding its share), and whether candidates
        were left behind (the window was full, or some were not picked or not got)."""
        now = utcnow()
        concurrency, cap = self.settings.concurrency, self.settings.tenant_concurrency
        window = free + concurrency  # room for other tenants' candidates behind one tenant's backlog
        at_share = tenants_at_share(self.inflight_by_tenant, concurrency, cap)
        # Whole documents: when the claim gets every one picked, it hands these out without a read.
        read = await self.store.due_documents(now, window, at_share)
        candidates = [(str(d["_id"]), str(d.get("tenant_id"))) for d in read]
        # A tenant left out for holding its share may have a backlog: each of its finished attempts
        # must claim again at once, not at the next poll (one tenant alone would get a share per
        # poll interval).
        more = bool(at_share)
        if not candidates:
            return [], more, False
        ids = fair_pick(candidates, self.inflight_by_tenant, free, concurrency, cap)
        claimed = await self.store.claim(now, ids, lease, self.instance, {str(d["_id"]): d for d in read})
        left_behind = len(candidates) == window or len(ids) < len(candidates) or len(claimed) < len(ids)
        return claimed, more or left_behind, left_behind

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        tenant = self._tenant_of.pop(task, None)
        if tenant is not None:
            self._untrack(tenant)
        elif self._saturated:
            self._wake.set()  # a slot is free and more may be due

    async def _recorder(self) -> None:
        """Write attempt outcomes in batches: whatever finished while the last write was in flight.

        Ends after writing everything queued before the `None` that `run` puts at shutdown.
        """
        stopping = False
        while not stopping:
            batch: list[AttemptResult] = []
            item = await self._results.get()
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if self._results.empty():
                    break
                item = self._results.get_nowait()
            if not batch:
                continue
            claimed = [self._claimed.pop(r.delivery_id, None) for r in batch]
            for retry_in in (0.2, 1.0, None):
                try:
                    written_at = await self.store.record(batch)
                    self._wake_when_due(batch)
                    # Only now that the outcomes (and their outbox entries) are stored: see statuses.py.
                    self._statuses_owed(batch, claimed, written_at)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if retry_in is None:
                        # The leases run out and the deliveries are attempted again: the documented
                        # duplicate window.
                        log.error("could not record %d delivery attempts: %r", len(batch), exc)
                    else:
                        await asyncio.sleep(retry_in)

    def _statuses_owed(self, batch: list[AttemptResult], claimed: list[Document | None],
                       written_at: datetime | None) -> None:
        """Hand the statuses the write just made owed to the teller: as the documents now stored
        when every outcome was written at `written_at` (the teller then reads nothing back), else as
        ids (it reads what is stored)."""
        owed = [(r, d) for r, d in zip(batch, claimed, strict=True)
                if r.tells_status and r.outcome in ("delivered", "failed")]
        if not owed:
            return
        if written_at is None or self.on_statuses_recorded is None or any(d is None for _, d in owed):
            self.on_statuses_owed([r.delivery_id for r, _ in owed])
            return
        self.on_statuses_recorded([recorded_doc(d, r, written_at) for r, d in owed if d is not None])

    def _wake_when_due(self, recorded: list[AttemptResult]) -> None:
        """Wake this worker when each recorded retry is due (other processes find it by polling).
        Only once it is recorded: a wake before the write would claim nothing and not come again."""
        loop, now = asyncio.get_running_loop(), utcnow()
        for r in recorded:
            if r.outcome == "retry" and r.next_attempt_at is not None:
                loop.call_later(max(0.0, (r.next_attempt_at - now).total_seconds()), self._wake.set)

    async def _attempt(self, d: Document) -> None:
        channel = str(d["channel"])
        attempt = int(d.get("attempts", 0)) + 1
        claim = str(d["claim"])
        tells = to_person(d.get("kind"), d.get("recipient"))
        result: AttemptResult
        if attempt > self.settings.max_attempts:
            # The last attempt already failed but its dead letter could not be published then.
            result = await self._fail(d, claim, attempt - 1, str(d.get("last_error") or "unknown"), None,
                                      d.get("last_outcome") or "error")
        else:
            status: int | None = None
            error: str | None = None
            outcome: Outcome = "2xx"
            delivery_span = None  # with tracing on, the attempt's span: the latency sample's exemplar
            try:
                # The attempt continues the trace stored with the delivery (the submission's): the
                # webhook request's `traceparent` (httpx instrumentation) carries it to the partner.
                with tracing.span(f"deliver {channel}", traceparent=d.get("traceparent"),
                                  attributes={"alliance.delivery.channel": channel,
                                              "alliance.delivery.kind": str(d.get("kind")),
                                              "alliance.delivery.attempt": attempt}) as delivery_span:
                    status = await asyncio.wait_for(self.senders[channel].send(d),
                                                    self.settings.attempt_timeout_seconds)
            except Cancelled as exc:
                metrics.NOTIFICATIONS.labels(channel, "cancelled").inc()
                await self._record(AttemptResult(d["_id"], claim, "cancelled", attempt - 1, error=str(exc)))
                return
            except TimeoutError:
                error, outcome = f"timeout after {self.settings.attempt_timeout_seconds:g}s", "timeout"
            except SendError as exc:
                error, status, outcome = str(exc), exc.status, exc.outcome
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or an unexpected library error: retry, never crash the worker
                log.exception("delivery attempt raised", extra={"delivery_id": d["_id"]})
                error, outcome = f"{type(exc).__name__}: {exc}", "error"
            metrics.ATTEMPTS.labels(channel, "ok" if error is None else "error").inc()
            if error is not None and outcome in NEEDS_OPERATOR:
                metrics.BLOCKED_ATTEMPTS.labels(outcome).inc()
            if error is None:
                result = AttemptResult(d["_id"], claim, "delivered", attempt, response_status=status,
                                       last_outcome="2xx", tells_status=tells)
                metrics.NOTIFICATIONS.labels(channel, "delivered").inc()
                origin = d.get("origin_at")
                if d.get("kind") == "alert" and isinstance(origin, datetime):
                    metrics.ALERT_TO_DELIVERED.labels(channel).observe(
                        max(0.0, (datetime.now(UTC) - origin).total_seconds()),
                        exemplar=tracing.exemplar(delivery_span))
            elif is_final(attempt, self.settings.max_attempts):
                result = await self._fail(d, claim, attempt, error, status, outcome)
            else:
                delay = backoff_seconds(attempt, self.settings.retry_first_seconds, self.settings.retry_max_seconds,
                                        self.jitter())
                result = AttemptResult(d["_id"], claim, "retry", attempt, error=error, response_status=status,
                                       next_attempt_at=utcnow() + timedelta(seconds=delay), last_outcome=outcome)
                log.info("delivery attempt %d failed, retrying in %.2fs: %s", attempt, delay, error,
                         extra={"delivery_id": d["_id"], "alert_id": d.get("alert_id")})
        await self._record(result)

    async def _fail(self, d: Document, claim: str, attempts: int, error: str, status: int | None,
                    outcome: str) -> AttemptResult:
        """Dead-letter the delivery, then mark it failed; if the broker is down, try again later."""
        try:
            await self.publisher.publish_all([dead_letter(d, attempts, error, self.topics.deadletter)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not publish the dead letter of a failed delivery: %r", exc,
                        extra={"delivery_id": d["_id"]})
            # attempts stays at the maximum: the next claim only retries the dead-lettering.
            return AttemptResult(d["_id"], claim, "retry", attempts, error=error, response_status=status,
                                 next_attempt_at=utcnow() + timedelta(seconds=self.settings.retry_first_seconds),
                                 last_outcome=outcome)
        metrics.NOTIFICATIONS.labels(str(d["channel"]), "failed").inc()
        log.warning("delivery failed after %d attempts: %s", attempts, error,
                    extra={"delivery_id": d["_id"], "alert_id": d.get("alert_id")})
        return AttemptResult(d["_id"], claim, "failed", attempts, error=error, response_status=status,
                             last_outcome=outcome, tells_status=to_person(d.get("kind"), d.get("recipient")))

    async def _record(self, result: AttemptResult) -> None:
        self._results.put_nowait(result)

    async def refresh_gauges(self) -> None:
        """Keep the pending gauges current (counts over all processes), until cancelled."""
        while True:
            try:
                pending, retrying = await self.store.count_pending()
                metrics.PENDING.set(pending)
                metrics.PENDING_RETRIES.set(retrying)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("gauge refresh failed: %r", exc)
            await asyncio.sleep(self.settings.gauge_seconds)
