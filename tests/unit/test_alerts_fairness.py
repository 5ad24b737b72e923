"""How the delivery worker shares its slots between tenants (`rules.fair_pick`, `rules.tenant_share`,
`rules.tenants_at_share`)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from services.alerts.rules import fair_pick, tenant_share, tenants_at_share

TENANT = st.sampled_from([f"t{i}" for i in range(12)])
CANDIDATES = st.lists(TENANT, max_size=80).map(lambda ts: [(f"d{i}", t) for i, t in enumerate(ts)])


def backlog(tenant: str, n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"{tenant}{i}", tenant) for i in range(start, start + n)]


def test_one_tenant_alone_never_gets_every_slot() -> None:
    assert fair_pick(backlog("a", 100), {}, free=32, concurrency=32, tenant_cap=8) == [f"a{i}" for i in range(8)]


def test_a_newcomer_behind_a_backlog_gets_a_slot_in_the_same_claim() -> None:
    picked = fair_pick([*backlog("a", 40), ("b0", "b")], {}, free=32, concurrency=32, tenant_cap=8)
    assert "b0" in picked and Counter(i[0] for i in picked) == {"a": 8, "b": 1}


def test_tenants_take_turns_in_the_order_of_their_oldest_due_delivery() -> None:
    candidates = [*backlog("a", 3), *backlog("b", 3)]
    assert fair_pick(candidates, {}, free=3, concurrency=32, tenant_cap=8) == ["a0", "b0", "a1"]


def test_a_tenant_at_its_share_gets_nothing_more() -> None:
    assert fair_pick([*backlog("a", 5), *backlog("b", 2)], {"a": 8}, free=24, concurrency=32,
                     tenant_cap=8) == ["b0", "b1"]


def test_the_share_shrinks_as_tenants_arrive() -> None:
    assert tenant_share(1, 32, 8) == 8
    assert tenant_share(8, 32, 8) == 4
    assert tenant_share(100, 32, 8) == 1


def test_tenants_at_their_share_are_left_out_of_the_candidates() -> None:
    assert tenants_at_share({"a": 8, "b": 3, "c": 0}, concurrency=32, tenant_cap=8) == ["a"]
    assert tenants_at_share({f"t{i}": 4 for i in range(8)}, concurrency=32, tenant_cap=8) == [
        f"t{i}" for i in range(8)]


@given(CANDIDATES, st.dictionaries(TENANT, st.integers(0, 8), max_size=6), st.integers(0, 64),
       st.integers(1, 64), st.integers(1, 16))
def test_picks_respect_free_slots_and_every_share(candidates: list[tuple[str, str]], inflight: dict[str, int],
                                                  free: int, concurrency: int, cap: int) -> None:
    picked = fair_pick(candidates, inflight, free, concurrency, cap)
    tenant_of = dict(candidates)
    assert len(picked) <= free and len(set(picked)) == len(picked) and set(picked) <= set(tenant_of)
    active = {t for _, t in candidates} | {t for t, n in inflight.items() if n > 0}
    share = tenant_share(len(active), concurrency, cap)
    for t, n in Counter(tenant_of[i] for i in picked).items():
        assert inflight.get(t, 0) + n <= share


@given(CANDIDATES.filter(bool), st.integers(1, 64), st.integers(1, 16))
def test_when_slots_suffice_every_tenant_among_the_candidates_gets_one(candidates: list[tuple[str, str]],
                                                                        concurrency: int, cap: int) -> None:
    tenants = {t for _, t in candidates}
    picked = fair_pick(candidates, {}, free=len(tenants), concurrency=concurrency, tenant_cap=cap)
    assert {dict(candidates)[i] for i in picked} == tenants


@given(CANDIDATES, st.integers(0, 64), st.integers(1, 64), st.integers(1, 16))
def test_within_a_tenant_the_oldest_due_go_first(candidates: list[tuple[str, str]], free: int,
                                                 concurrency: int, cap: int) -> None:
    picked = set(fair_pick(candidates, {}, free, concurrency, cap))
    for t in {t for _, t in candidates}:
        mine = [i for i, u in candidates if u == t]
        taken = [i in picked for i in mine]
        assert taken == sorted(taken, reverse=True)  # a prefix of the tenant's candidates
