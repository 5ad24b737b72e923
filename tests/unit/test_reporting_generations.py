"""The generation pointer's cache (`services.reporting.store.Generations`): callers finding it
expired at the same time share one read, and a flip of the pointer is never hidden by a read begun
before it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pymongo.asynchronous.database import AsyncDatabase

from services.reporting.store import POINTER_ID, Generations
from shared.mongo import Document


class UpdateResult:
    modified_count = 1


class PointerCollection:
    """The meta collection's pointer document; each read takes a while (`gate`) and is counted."""

    def __init__(self) -> None:
        self.doc: Document = {"_id": POINTER_ID, "active": "g1", "building": None, "previous": None, "seq": 1}
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

        self.held: asyncio.Event | None = None  # holds back only the next read's answer
        self.arrived = asyncio.Event()  # a read reached the store

    async def find_one(self, query: Document) -> Document | None:
        self.reads += 1
        self.arrived.set()
        seen = dict(self.doc)  # what the store answers is what it held when the read arrived
        held, self.held = self.held, None
        if held is not None:
            await held.wait()
        await self.gate.wait()
        return seen

    async def update_one(self, query: Document, update: Document) -> UpdateResult:
        self.doc.update(update["$set"])
        return UpdateResult()


def generations(meta: PointerCollection, ttl: float = 60.0) -> Generations:
    db = cast(AsyncDatabase[Document], cast(Any, {"reporting_meta": meta}))
    return Generations(db, ttl)


async def test_callers_finding_the_pointer_expired_together_share_one_read() -> None:
    meta = PointerCollection()
    gens = generations(meta)
    meta.gate.clear()
    callers = [asyncio.create_task(gens.current()) for _ in range(8)]
    await asyncio.sleep(0)
    meta.gate.set()
    states = await asyncio.gather(*callers)
    assert {s.active for s in states} == {"g1"}
    assert meta.reads == 1


async def test_the_pointer_is_read_again_once_its_time_to_live_has_passed() -> None:
    meta = PointerCollection()
    gens = generations(meta, ttl=0.01)
    await gens.current()
    await asyncio.sleep(0.02)
    await gens.current()
    assert meta.reads == 2


async def test_a_switch_is_not_hidden_by_a_read_begun_before_it() -> None:
    meta = PointerCollection()
    gens = generations(meta)
    held = meta.held = asyncio.Event()
    early = asyncio.create_task(gens.current())  # reads g1 as active; its answer is held back
    await meta.arrived.wait()
    meta.doc["building"] = "g2"
    assert (await gens.switch("g2")).active == "g2"  # not the early read's answer
    held.set()
    assert (await early).active == "g1"
    assert (await gens.current()).active == "g2"  # nor was that answer cached over the switch
