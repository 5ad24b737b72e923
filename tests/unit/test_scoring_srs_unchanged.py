"""The SRS contract did not move when the ORS arrived (issue 16): for clients without an ORS,
scoring publishes the same bytes and stores the same state as before.

`tests/fixtures/scoring/srs-only.json` was written by the scoring code of the commit before the
ORS was scored (b6da435 + the outcome rules, series untouched), from the scenario below: random
clients with every instrument, corrections under the same and new ids, identical resends, late
sessions, restarts of the numbering, other sites' submissions, transfers and redeliveries. Run
this module as a script to see what the current code produces.

Regenerated once since (2026-11-27), when scoring began to keep the earliest accepted version of
a corrected submission (`og` in a stored version; a corrected time no longer renames a derived
episode, docs/clinical-records.md): the events were byte-identical, and the stored states differed
only by the `og` of each corrected submission. And again when an alert revised after a transfer
began to be raised for the site that owns the client then (`series.revision_site`): one alert
revision of client-2 (after its transfer to south) says `site_id` south instead of north, and
its stored alert record the same; nothing else changed. And again when a redelivery began to
re-emit the last raise of an ended alert beside its end (a crash could otherwise lose a raise that
the same batch superseded; services/scoring/handlers.py): 16 more events, each byte-equal to a raise
published before it, and the ended alert records keep their raise time (`ra`); nothing else changed.
And again when scoring began to keep the ownership timeline (a site_conflict is judged by the site
that owned the client when the version was accepted, docs/clinical-records.md, "Site ownership"):
the events were byte-identical, and the stored states differed only by the `ho` (one entry per
transfer that changed the site) of the two clients transferred (client-1, client-2), checked by
script field by field.
And again when a withdrawn alert began to keep its raise (`rv`: its session left its slot or no
longer triggers, so a redelivery cannot score it again): 15 more events, each byte-equal to a raise
published before it and followed by that alert's withdrawal, and the 13 withdrawn alert records keep
their raise (`rv`); without `rv` the stored states are equal; nothing else changed.
And again when a session published again while it shows the same submission began to name the
submission it replaced under a new id once more (`supersedes`; a crash could lose the revision that
named it first): one event of client-3 names in `supersedes` the submission an earlier revision of
that session named, where it said null; nothing else changed (checked by script event by event and
field by field of the stored states).
And again when the ownership timeline began to hold every transfer at its place by acceptance, a
transfer to the site that already owned the client included (two transfers read in reverse
acceptance order: the one accepted last decides, docs/clinical-records.md, "Site ownership"): the
events were byte-identical, and the stored states differ only by 6 more `ho` entries, each a
transfer to the owning site (`f` = `t`: tx-0-0, tx-0-1, tx-1-1, tx-2-2, tx-3-0, tx-3-2), of
client-0 to client-3; nothing else changed (checked by script event by event and field by field).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.scoring.handlers import alert_event, scored_event, status_event
from services.scoring.rules import TenantRules
from services.scoring.series import AlertOut, ClientState, Output, ScoredOut, Version
from services.scoring.store import ClientKey, state_doc

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "scoring" / "srs-only.json"
TENANT = "acme"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
RULES = TenantRules(instruments={})


def _event(client: str, o: Output) -> str:
    if isinstance(o, ScoredOut):
        return scored_event(TENANT, client, o).model_dump_json()
    if isinstance(o, AlertOut):
        return alert_event(TENANT, client, o).model_dump_json()
    return status_event(TENANT, client, o).model_dump_json()


def _stored(client: str, st: ClientState) -> dict[str, Any]:
    doc = state_doc(ClientKey(TENANT, client), st, st.version)
    doc.pop("updated_at")
    return doc


def scenario(seed: int = 16, clients: int = 6, records: int = 40) -> dict[str, Any]:
    """Every event each client's records produce, in order, and each client's stored state."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for c in range(clients):
        client = f"client-{c}"
        st = ClientState(TENANT, client)
        events: list[str] = []
        sent: list[Version] = []
        clock = START
        for r in range(records):
            clock += timedelta(seconds=1)
            roll = rng.random()
            if roll < 0.04:
                step = st.transfer(f"tx-{c}-{r % 3}", rng.choice(["north", "south"]), RULES, clock)
            elif roll < 0.12 and sent:
                step = st.submit(rng.choice(sent), RULES, clock)  # a redelivery
                if step.redelivered:
                    step.outputs = st.current_outputs(RULES)
            elif roll < 0.16 and sent:  # an identical resend under a new id
                v = replace(rng.choice(sent), submission_id=f"s-{c}-again-{r}", accepted_at=clock)
                sent.append(v)
                step = st.submit(v, RULES, clock)
            else:
                number = rng.randint(1, 9)
                day = number + (30 if rng.random() < 0.2 else 0)  # a second course a month later
                sid = f"s-{c}-{rng.randint(0, 14)}" if rng.random() < 0.7 else f"s-{c}-new-{r}"
                total = rng.choice([None, round(rng.uniform(20, 40), 1)])
                items = None if total is not None else tuple(round(rng.uniform(5, 10), 1) for _ in range(4))
                v = Version(sid, rng.choice(["SRS", "SRS", "SRS", "CSRS", "GSRS", "YCSRS"]),
                            rng.choice([None, None, "ep-a"]), number, START + timedelta(days=day),
                            "south" if rng.random() < 0.05 else "north", f"clin-{rng.randint(1, 2)}",
                            items, total, clock)  # type: ignore[arg-type]
                sent.append(v)
                step = st.submit(v, RULES, clock)
            events.extend(_event(client, o) for o in step.outputs)
            if step.rejection is not None:
                events.append(f"rejected {step.rejection.reason}: {step.rejection.detail}")
        out[client] = {"events": events, "state": _stored(client, st)}
    return out


def test_clients_without_an_ors_get_the_same_events_and_state_as_before_the_ors() -> None:
    expected = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(scenario()))
    for client in expected:
        assert got[client]["events"] == expected[client]["events"], client
        assert got[client]["state"] == expected[client]["state"], client
    assert got.keys() == expected.keys()


if __name__ == "__main__":
    json.dump(scenario(), sys.stdout, indent=1, sort_keys=True)
