"""What happened to a submission: the status rules over the three monotone parts, the pre-fold of a
batch's writes, and which dead letters count as rejections."""

from __future__ import annotations

import base64
import itertools
from datetime import timedelta
from typing import Any

import pytest

from services.reporting import rules
from services.reporting.handlers import rejection
from shared.events import ClientTransfer, DeadLetter, SrsScored, SrsSubmitted
from shared.topics import Topics
from tools.demo import BASE, revised, scored

T = "t"


def submitted_like(event: SrsScored, *, accepted_delta: timedelta = timedelta(0), **changes: Any) -> SrsSubmitted:
    assert event.accepted_at is not None
    data: dict[str, Any] = {
        "event_id": "sub-" + event.submission_id, "tenant_id": event.tenant_id, "occurred_at": event.accepted_at,
        "submission_id": event.submission_id, "site_id": event.site_id, "clinician_id": event.clinician_id,
        "client_id": event.client_id, "episode_id": event.episode_id, "instrument": event.instrument,
        "session_number": event.session_number, "administered_at": event.administered_at, "total": event.total,
        "accepted_at": event.accepted_at + accepted_delta}
    data.update(changes)
    return SrsSubmitted.model_validate(data)


def dead_letter(submitted: SrsSubmitted, reason: str = "session_gap", *, topic: str = "srs.submitted.v1",
                tenant_id: str | None = T, encoding: str = "utf-8") -> DeadLetter:
    payload = submitted.model_dump_json()
    if encoding == "base64":
        payload = base64.b64encode(payload.encode()).decode()
    return DeadLetter(event_id="dl-" + submitted.submission_id, tenant_id=tenant_id,
                      occurred_at=submitted.accepted_at + timedelta(seconds=1), service="scoring", reason=reason,
                      detail=f"because {reason}", source_topic=topic, payload=payload,
                      payload_encoding=encoding)  # type: ignore[arg-type]


def doc_of(submission_id: str, **parts: dict[str, Any]) -> dict[str, Any]:
    return {"submission_id": submission_id, **parts}


def test_a_scored_submission_says_what_scoring_decided() -> None:
    e = scored(T, "c1", 3, 35.3, episode_id="auto/2026-11-03/1")
    view = rules.submission_view(doc_of(e.submission_id, scored=rules.scored_part(e)))
    assert view is not None
    assert {k: view[k] for k in ("status", "reason", "revision", "client_id", "episode_id", "session_number",
                                 "total", "flags", "superseded_by")} == {
        "status": "scored", "reason": None, "revision": 1, "client_id": "c1", "episode_id": "auto/2026-11-03/1",
        "session_number": 3, "total": 35.3, "flags": ["below_cutoff"], "superseded_by": None}


def test_a_submission_superseded_by_a_higher_revision_names_its_successor() -> None:
    e = scored(T, "c1", 1, 30.0, submission_id="old")
    fix = revised(e, submission_id="new", total=31.0)
    view = rules.submission_view(doc_of("old", scored=rules.scored_part(e), superseded=rules.superseded_part(fix)))
    assert view is not None and (view["status"], view["superseded_by"], view["revision"]) == ("superseded", "new", 1)


def test_a_superseded_submission_revived_by_a_higher_revision_is_scored_again() -> None:
    e = scored(T, "c1", 1, 30.0, submission_id="old")
    fix = revised(e, submission_id="new", total=31.0)
    back = revised(fix, submission_id="old", total=32.0)  # revision 3
    doc = doc_of("old", scored=rules.scored_part(back), superseded=rules.superseded_part(fix))
    assert rules.submission_status(doc) == "scored"


def test_known_only_as_superseded_is_superseded() -> None:
    e = scored(T, "c1", 1, 30.0, submission_id="old")
    doc = doc_of("old", superseded=rules.superseded_part(revised(e, submission_id="new")))
    assert rules.submission_status(doc) == "superseded"
    assert rules.submission_view(doc, "north") is not None and rules.submission_view(doc, "south") is None


def test_nothing_known_is_no_answer() -> None:
    assert rules.submission_view(doc_of("x")) is None


@pytest.mark.parametrize(("delta", "expected"), [(timedelta(minutes=5), "rejected"), (timedelta(minutes=-5), "scored"),
                                                 (timedelta(0), "scored")])
def test_rejected_only_when_the_rejected_version_was_accepted_after_the_scored_one(
        delta: timedelta, expected: str) -> None:
    e = scored(T, "c1", 2, 38.0)
    dead = dead_letter(submitted_like(e, accepted_delta=delta, site_id="south"), "site_conflict")
    doc = doc_of(e.submission_id, scored=rules.scored_part(e), rejected=rules.rejected_part(dead, submitted_like(
        e, accepted_delta=delta, site_id="south")))
    assert rules.submission_status(doc) == expected
    view = rules.submission_view(doc)
    assert view is not None
    if expected == "rejected":
        assert (view["reason"], view["detail"], view["revision"], view["flags"]) == (
            "site_conflict", "because site_conflict", None, [])
        assert (rules.submission_view(doc, "south") or {}).get("status") == "rejected"
    else:
        assert view["reason"] is None and view["revision"] == 1
        assert (rules.submission_view(doc, "north") or {}).get("status") == "scored"


def test_a_refusal_a_transfer_took_back_is_answered_scored_and_keeps_its_rejection_time() -> None:
    # The new site's form refused site_conflict when read before the transfer, then scored by it
    # (docs/clinical-records.md, "Site ownership"): the same version, so the same acceptance time.
    e = scored(T, "c1", 2, 38.0, site_id="south", site_version=1)
    sub = submitted_like(e)
    doc = doc_of(e.submission_id, scored=rules.scored_part(e),
                 rejected=rules.rejected_part(dead_letter(sub, "site_conflict"), sub))
    for key_site in (None, "south"):
        view = rules.submission_view(doc, key_site)
        assert view is not None
        assert (view["status"], view["reason"], view["revision"], view["rejected_at"]) == (
            "scored", None, 1, dead_letter(sub).occurred_at.isoformat())
    assert rules.submission_view(doc, "north") is None


def re_judged_letters() -> tuple[SrsSubmitted, list[DeadLetter]]:
    """A version's dead letters when a transfer re-judged its site_conflict into a session gap: the
    first refusal, the re-judging's (its payload rebuilt by scoring: other bytes), and the one of the
    refused record itself redelivered after it (the record's refusal now, its own bytes)."""
    sub = submitted_like(scored(T, "c1", 30, 25.0, site_id="south"))
    conflict = dead_letter(sub, "site_conflict")
    rebuilt = sub.model_copy(update={"event_id": "rebuilt"})
    again = dead_letter(rebuilt, "session_gap").model_copy(update={"judgement": 1, "payload": rebuilt.model_dump_json(),
                                                                  "occurred_at": conflict.occurred_at + timedelta(1)})
    redelivered = dead_letter(sub, "session_gap").model_copy(update={"judgement": 1})
    return sub, [conflict, again, redelivered]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_refusal_re_judged_for_another_reason_is_answered_with_it_whatever_order_its_letters_are_read(
        order: tuple[int, ...]) -> None:
    sub, letters = re_judged_letters()
    parts = [("d", "rejected", rules.rejected_part(letters[i], sub)) for i in order]
    doc = doc_of(sub.submission_id, rejected=rules.fold_parts(parts)[("d", "rejected")])
    view = rules.submission_view(doc)
    assert view is not None and (view["status"], view["reason"]) == ("rejected", "session_gap")


def test_a_re_judgement_outranks_a_first_judgement_of_its_version_whatever_their_digests() -> None:
    sub, (conflict, again, _) = re_judged_letters()
    for n in range(64):  # payloads whose digests start with every hex digit: a key stored before the rule too
        first = conflict.model_copy(update={"payload": f"{n}"})
        assert rules.rejected_part(again, sub)["key"] > rules.rejected_part(first, sub)["key"]


def test_a_version_accepted_later_still_outranks_an_earlier_versions_re_judgement() -> None:
    sub, (_, again, _) = re_judged_letters()
    later = submitted_like(scored(T, "c1", 30, 26.0, site_id="south"), accepted_delta=timedelta(seconds=1))
    assert rules.rejected_part(dead_letter(later), later)["key"] > rules.rejected_part(again, sub)["key"]


def test_a_rejection_alone_is_rejected_with_what_was_submitted() -> None:
    e = scored(T, "c1", 41, 30.0)
    sub = submitted_like(e)
    view = rules.submission_view(doc_of(e.submission_id, rejected=rules.rejected_part(dead_letter(sub), sub)))
    assert view is not None
    assert (view["status"], view["reason"], view["client_id"], view["session_number"], view["total"]) == (
        "rejected", "session_gap", "c1", 41, 30.0)


def test_each_part_keeps_its_greatest_key_in_any_order() -> None:
    e = scored(T, "c1", 1, 30.0, submission_id="s")
    r2 = revised(e, total=31.0)
    r3 = revised(r2, total=32.0)
    by_b = revised(r3, submission_id="b")  # revision 4, supersedes s
    by_c = revised(by_b, submission_id="c", supersedes="s")  # revision 5 names s as well
    sub_early, sub_late = submitted_like(e, accepted_delta=timedelta(hours=1)), submitted_like(
        e, accepted_delta=timedelta(hours=2), total=20.0)
    parts = [("d", "scored", rules.scored_part(x)) for x in (e, r2, r3)]
    parts += [("d", "superseded", rules.superseded_part(x)) for x in (by_b, by_c)]
    parts += [("d", "rejected", rules.rejected_part(dead_letter(x), x)) for x in (sub_early, sub_late)]
    folded = {rules.fold_parts(order)[("d", name)]["key"] for order in itertools.permutations(parts, len(parts))
              for name in ("scored", "superseded", "rejected")}
    assert len(folded) == 3
    final = rules.fold_parts(parts)
    assert final[("d", "scored")]["revision"] == 3
    assert final[("d", "superseded")]["by"] == "c"
    assert final[("d", "rejected")]["total"] == 20.0


def test_the_rejections_page_floor_includes_a_rejection_at_exactly_since() -> None:
    e = scored(T, "c1", 1, 30.0)
    sub = submitted_like(e)
    dead = dead_letter(sub)
    assert rules.rejected_part(dead, sub)["sort"] > rules.rejection_sort_floor(dead.occurred_at)
    assert rules.rejected_part(dead, sub)["sort"] < rules.rejection_sort_floor(dead.occurred_at + timedelta(
        microseconds=1))


TOPICS = Topics("ns.")


def test_a_dead_lettered_submission_is_a_rejection_of_its_tenant() -> None:
    sub = submitted_like(scored(T, "c1", 1, 30.0))
    assert rejection(dead_letter(sub, topic="ns.srs.submitted.v1"), TOPICS) == (T, sub)
    assert rejection(dead_letter(sub, topic="ns.srs.submitted.v1", encoding="base64"), TOPICS) == (T, sub)
    # no tenant on the dead letter: the submission's
    assert rejection(dead_letter(sub, topic="ns.srs.submitted.v1", tenant_id=None), TOPICS) == (T, sub)


def test_dead_letters_of_other_topics_or_payloads_are_not_rejections() -> None:
    sub = submitted_like(scored(T, "c1", 1, 30.0))
    assert rejection(dead_letter(sub, topic="ns.srs.scored.v1"), TOPICS) is None
    assert rejection(dead_letter(sub, topic="srs.submitted.v1"), TOPICS) is None  # another deployment's prefix
    not_a_submission = dead_letter(sub, topic="ns.srs.submitted.v1").model_copy(update={"payload": "{not json"})
    assert rejection(not_a_submission, TOPICS) is None
    bad_base64 = dead_letter(sub, topic="ns.srs.submitted.v1").model_copy(
        update={"payload": "%%%", "payload_encoding": "base64"})
    assert rejection(bad_base64, TOPICS) is None


def test_a_dead_lettered_transfer_copy_on_the_ors_topic_is_not_a_rejection() -> None:
    # What a scoring of before both copies makes of intake's copy on ors.submitted.v1 (docs/operations.md).
    sub = submitted_like(scored(T, "c1", 1, 30.0))
    move = ClientTransfer(event_id="tx-1", tenant_id=T, occurred_at=sub.accepted_at, client_id="c1",
                          site_id="south", accepted_at=sub.accepted_at)
    letter = dead_letter(sub, "invalid", topic="ns.ors.submitted.v1").model_copy(
        update={"payload": move.model_dump_json()})
    assert rejection(letter, TOPICS) is None


def test_a_submission_that_moved_is_answered_for_the_newest_versions_client_in_any_order() -> None:
    first = scored(T, "c1", 2, 30.0, submission_id="m", accepted_at=BASE)
    second = scored(T, "c2", 2, 30.0, submission_id="m", accepted_at=BASE + timedelta(hours=1))  # revision 1 too
    for order in ([first, second], [second, first]):
        final = rules.fold_parts([("d", "scored", rules.scored_part(e)) for e in order])
        assert final[("d", "scored")]["client_id"] == "c2"


def test_a_later_revision_of_one_clients_version_is_newer_whatever_its_key_was_stored_as() -> None:
    e = scored(T, "c1", 1, 30.0, submission_id="s", accepted_at=BASE)
    legacy = {**rules.scored_part(e), "key": "0000000001"}  # stored before acceptance led the key
    assert rules.scored_part(revised(e, total=31.0))["key"] > legacy["key"]
    assert rules.scored_part(revised(e, total=31.0))["key"] > rules.scored_part(e)["key"]


def _transferred_then_re_exported() -> dict[str, Any]:
    """Scored at north, re-published for south by a transfer (revision 2), then north's re-export
    of the session, accepted later, refused `site_conflict`."""
    e = revised(scored(T, "c1", 1, 38.0), site_id="south")
    late = submitted_like(e, accepted_delta=timedelta(minutes=5), site_id="north", total=30.0)
    return doc_of(e.submission_id, scored=rules.scored_part(e),
                  rejected=rules.rejected_part(dead_letter(late, "site_conflict"), late))


def test_after_a_transfer_the_new_site_still_sees_its_clients_session_scored() -> None:
    view = rules.submission_view(_transferred_then_re_exported(), "south")
    assert view is not None and (view["status"], view["revision"], view["total"], view["reason"]) == (
        "scored", 2, 38.0, None)


def test_after_a_transfer_the_old_site_sees_its_re_export_refused_and_nothing_of_the_new_site() -> None:
    view = rules.submission_view(_transferred_then_re_exported(), "north")
    assert view is not None and (view["status"], view["reason"], view["total"], view["revision"]) == (
        "rejected", "site_conflict", 30.0, None)


def test_a_tenant_wide_key_sees_the_version_accepted_last() -> None:
    view = rules.submission_view(_transferred_then_re_exported())
    assert view is not None and view["status"] == "rejected"


def test_a_site_with_no_part_of_a_submission_sees_nothing() -> None:
    assert rules.submission_view(_transferred_then_re_exported(), "east") is None
