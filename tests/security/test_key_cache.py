"""The API key cache is an LRU of known keys that unknown keys cannot flush (issue 12, item 8: the
cache was cleared at 10,000 entries, unknown keys included, so a random-key flood pushed valid keys
out and every request of theirs went to the store again)."""

from __future__ import annotations

import secrets
from typing import Any, cast

from pymongo import AsyncMongoClient

from shared import auth
from shared.mongo import Document
from tests.support.apps import PROBES, build_app, client, new_key
from tests.support.services import Namespace


class CountingKeys:
    """A stand-in for the key collection that counts look-ups per stored digest."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = {d["_id"]: d for d in docs}
        self.reads: dict[str, int] = {}

    def __getitem__(self, _collection: str) -> CountingKeys:
        return self

    async def find_one(self, query: dict[str, str]) -> dict[str, Any] | None:
        self.reads[query["_id"]] = self.reads.get(query["_id"], 0) + 1
        return self.docs.get(query["_id"])


def stored(key: str, revoked: bool = False) -> dict[str, Any]:
    digest = auth.hash_key(key)
    return {"_id": digest, "key_id": digest[:16], "tenant_id": "acme", "role": "read", "revoked": revoked}


def keystore(store: CountingKeys, max_entries: int) -> auth.KeyStore:
    return auth.KeyStore(cast(Any, store), ttl_seconds=3600, max_entries=max_entries)


async def test_a_flood_of_unknown_keys_does_not_make_a_known_key_be_read_again() -> None:
    valid = auth.new_key()
    store = CountingKeys([stored(valid)])
    keys = keystore(store, max_entries=10)
    assert await keys.lookup(valid) is not None
    for _ in range(1_000):
        assert await keys.lookup(auth.new_key()) is None
    assert await keys.lookup(valid) is not None
    assert store.reads[auth.hash_key(valid)] == 1
    assert len(keys) == 1


async def test_the_cache_keeps_at_most_its_bound_of_known_keys_dropping_the_least_recently_used() -> None:
    known = [auth.new_key() for _ in range(4)]
    store = CountingKeys([stored(k) for k in known])
    keys = keystore(store, max_entries=3)
    for k in known[:3]:
        await keys.lookup(k)
    await keys.lookup(known[0])  # used again: now the most recent
    await keys.lookup(known[3])  # one too many: known[1], the least recently used, is dropped
    assert len(keys) == 3
    for k in (known[0], known[2], known[3]):
        await keys.lookup(k)
    await keys.lookup(known[1])
    assert [store.reads[auth.hash_key(k)] for k in known] == [1, 2, 1, 1]


async def test_an_unknown_or_revoked_key_is_looked_up_every_time_and_never_cached() -> None:
    revoked = auth.new_key()
    store = CountingKeys([stored(revoked, revoked=True)])
    keys = keystore(store, max_entries=10)
    for _ in range(3):
        assert await keys.lookup(revoked) is None
    assert store.reads[auth.hash_key(revoked)] == 3
    assert len(keys) == 0


async def test_over_http_a_random_key_flood_leaves_only_the_valid_key_cached_and_it_is_not_read_again(
        namespace: Namespace) -> None:
    """Through intake: after 300 random keys (the failed-authentication limit raised out of the way),
    the cache holds the one valid key, which keeps working although the store now says it is revoked:
    it was not read again."""
    probe = PROBES["intake"]
    app = build_app("intake", namespace, intake={"key_cache_entries": 50, "key_cache_seconds": 3600},
                    auth_failure_burst=100_000)
    key = await new_key(namespace, probe.role)
    async with client(app) as http:
        assert (await probe.send(http, key)).status_code == probe.answer
        for _ in range(300):
            assert (await probe.send(http, "ak_" + secrets.token_urlsafe(32))).status_code == 401
        mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace.stack.mongo_url)
        try:
            await mongo[namespace.database][auth.KEYS].update_one({"_id": auth.hash_key(key)},
                                                                  {"$set": {"revoked": True}})
        finally:
            await mongo.close()
        assert (await probe.send(http, key)).status_code == probe.answer
    assert len(app.state.intake.keys) == 1
