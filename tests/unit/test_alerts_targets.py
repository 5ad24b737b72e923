"""Webhook target checks (name resolution included: `localhost` resolves without a network)."""

from __future__ import annotations

import pytest

from services.alerts.targets import target_problem


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:9/x", "loopback"), ("http://localhost/x", "loopback"), ("https://10.0.0.5/", "private"),
    ("http://[::1]:8080/", "loopback"), ("http://169.254.169.254/latest/meta-data", "link-local")])
async def test_private_targets_are_refused_by_default(url: str, why: str) -> None:
    assert await target_problem(url, allow_private=False) == f"the URL points to a {why} address"


async def test_private_targets_are_allowed_when_the_setting_says_so() -> None:
    assert await target_problem("http://127.0.0.1:9/x", allow_private=True) is None


async def test_public_literal_address_is_accepted() -> None:
    assert await target_problem("https://93.184.216.34/hook", allow_private=False) is None


async def test_scheme_is_checked_even_when_private_targets_are_allowed() -> None:
    assert await target_problem("gopher://127.0.0.1/", allow_private=True) == "only http and https URLs are allowed"


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    problem = await target_problem("https://no-such-host.invalid/x", allow_private=False)
    assert problem is not None and "does not resolve" in problem
