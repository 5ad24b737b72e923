"""Fault tests run on a stack of their own, so killing the broker or store harms no other test."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import StackUnderTest
from tools.stack import LocalStack, free_port


def _local(durable: bool) -> LocalStack:
    data = Path(tempfile.mkdtemp(prefix="alliance-fault-"))
    return LocalStack(data, durable=durable, kafka_port=free_port(), mongo_port=free_port(), s3_port=free_port())


@pytest.fixture(scope="module")
def fault_stack() -> Iterator[StackUnderTest]:
    """Memory broker, disk-backed store (so the store can be restarted without losing data)."""
    local = _local(durable=False)
    local.start()
    try:
        yield StackUnderTest("local-fault", local.bootstrap, local.mongo_url, False, local)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def durable_stack() -> Iterator[StackUnderTest]:
    """Durable broker (s3 over localbucket): its log survives kill -9."""
    local = _local(durable=True)
    local.start()
    try:
        yield StackUnderTest("local-durable", local.bootstrap, local.mongo_url, False, local)
    finally:
        local.stop()
