"""The duplicate-key policy of `shared.mongo`'s bulk writes against the real local store: a
duplicate key is reported by the index of its op and the other ops are written; any other write
error is raised; a versioned write reports the documents another writer changed first; documents
are read by id in short lists."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient, InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from shared.mongo import Document, bulk_write, find_by_ids, guarded_upserts, write_versioned
from tests.support.services import Namespace


@pytest.fixture
def col(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> AsyncCollection[Document]:
    return mongo[namespace.database]["kit"]


async def test_a_duplicate_key_is_reported_by_its_op_index_and_the_other_ops_are_written(
        col: AsyncCollection[Document]) -> None:
    await col.insert_one({"_id": "b"})
    written = await bulk_write(col, [InsertOne({"_id": "a"}), InsertOne({"_id": "b"}), InsertOne({"_id": "c"})])
    assert written.duplicates == (1,) and written.inserted == 2
    assert sorted(d["_id"] for d in await col.find({}).to_list()) == ["a", "b", "c"]


async def test_a_write_error_other_than_a_duplicate_key_is_raised(col: AsyncCollection[Document]) -> None:
    await col.insert_one({"_id": "a", "n": 1})
    with pytest.raises(BulkWriteError):
        await bulk_write(col, [InsertOne({"_id": "a"}), UpdateOne({"_id": "a"}, {"$inc": {"n": "not a number"}})])


async def test_a_versioned_write_over_the_version_read_replaces_the_document(
        col: AsyncCollection[Document]) -> None:
    assert await write_versioned(col, [("k", {"_id": "k", "v": 1, "x": "first"}, None)]) == set()
    assert await write_versioned(col, [("k", {"_id": "k", "v": 2, "x": "second"}, 1)]) == set()
    assert await col.find_one({"_id": "k"}) == {"_id": "k", "v": 2, "x": "second"}


async def test_a_versioned_write_over_a_version_another_writer_changed_is_a_conflict_and_writes_nothing(
        col: AsyncCollection[Document]) -> None:
    await col.insert_one({"_id": "k", "v": 2, "x": "theirs"})
    conflicts = await write_versioned(col, [("k", {"_id": "k", "v": 2, "x": "mine"}, 1),
                                            ("other", {"_id": "other", "v": 1}, None)])
    assert conflicts == {"k"}
    assert await col.find_one({"_id": "k"}) == {"_id": "k", "v": 2, "x": "theirs"}
    assert await col.find_one({"_id": "other"}) is not None


async def test_a_versioned_insert_of_a_document_another_writer_created_is_a_conflict(
        col: AsyncCollection[Document]) -> None:
    await col.insert_one({"_id": "k", "v": 1, "x": "theirs"})
    assert await write_versioned(col, [("k", {"_id": "k", "v": 1, "x": "mine"}, None)]) == {"k"}


async def test_a_guarded_upsert_whose_guard_misses_is_a_stale_write_that_changes_nothing(
        col: AsyncCollection[Document]) -> None:
    await col.insert_one({"_id": "a", "key": 5})
    newer = UpdateOne({"_id": "a", "key": {"$lt": 7}}, {"$set": {"key": 7}}, upsert=True)
    older = UpdateOne({"_id": "a", "key": {"$lt": 3}}, {"$set": {"key": 3}}, upsert=True)
    assert await guarded_upserts(col, [older]) == 0
    assert await guarded_upserts(col, [newer]) == 1
    assert await col.find_one({"_id": "a"}) == {"_id": "a", "key": 7}


async def test_reading_by_ids_in_short_lists_returns_every_existing_document_once(
        col: AsyncCollection[Document]) -> None:
    await col.insert_many([{"_id": f"d{i:03d}", "n": i} for i in range(60)])
    wanted = {f"d{i:03d}" for i in range(0, 60, 2)} | {"missing-1", "missing-2"}
    found = await find_by_ids(col, wanted, per_read=7)
    assert sorted(d["_id"] for d in found) == sorted(wanted - {"missing-1", "missing-2"})
