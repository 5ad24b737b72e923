"""The test kit's `eventually`: a wait that times out says what it last observed, so that a flaky
end-to-end failure shows where the pipeline stuck (a trajectory's rows, the deliveries so far)."""

from __future__ import annotations

import pytest

from tests.support.wait import eventually


async def test_a_wait_with_a_done_condition_returns_the_observed_value_once_it_is_done() -> None:
    seen: list[int] = []

    async def observe() -> list[int]:
        seen.append(len(seen))
        return list(seen)

    assert await eventually(observe, until=lambda values: len(values) == 3, interval=0) == [0, 1, 2]


async def test_a_wait_that_times_out_names_the_value_it_last_observed() -> None:
    async def observe() -> dict[str, list[str]]:
        return {"aligned": ["session 1"]}

    with pytest.raises(AssertionError, match=r"last: \{'aligned': \['session 1'\]\}"):
        await eventually(observe, until=lambda body: len(body["aligned"]) == 3, timeout=0.05, interval=0.01)


async def test_a_wait_without_a_done_condition_waits_for_a_truthy_value() -> None:
    values = iter([None, [], "done"])

    async def observe() -> str | list[str] | None:
        return next(values)

    assert await eventually(observe, interval=0) == "done"
