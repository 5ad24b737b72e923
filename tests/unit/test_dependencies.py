"""What the pinned dependencies must give the services at run time (pyproject.toml says why each is there)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

import pytest
from httpcore._synchronization import current_async_library


class CountingFinder(MetaPathFinder):
    """Counts the look-ups the import system makes for one module name (and finds nothing)."""

    def __init__(self, name: str) -> None:
        self.name, self.lookups = name, 0

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname == self.name:
            self.lookups += 1
        return None


async def test_httpcore_finds_sniffio_without_searching_the_import_path_on_every_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without sniffio installed, each call failed an import that walked every path entry
    # (encode/httpcore#1103): ~10% of the CPU of an httpx request on this machine.
    finder = CountingFinder("sniffio")
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for _ in range(100):
        assert current_async_library() == "asyncio"
    assert finder.lookups == 0
