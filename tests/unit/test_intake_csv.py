"""The CSV format of EHR exports: columns, empty cells, line numbers, derived submission ids."""

from __future__ import annotations

from datetime import UTC, datetime

from services.intake.csvformat import COLUMNS, CsvFile, parse_csv, row_to_submission, session_submission_id, to_csv
from services.intake.models import SubmissionIn, check_submission

HEADER = ("submission_id,client_id,clinician_id,site_id,session_number,administered_at,"
          "relationship,goals,approach,overall,total")


def test_a_row_with_items_becomes_a_submission_with_numbers() -> None:
    f = parse_csv(HEADER + "\nn-1,p-1,c-17,north,3,2026-11-25T14:05:00+00:00,9.1,8.4,9,8.8,\n")
    assert f.errors == []
    [row] = f.rows
    assert row.line == 2
    assert row.data == {"submission_id": "n-1", "client_id": "p-1", "clinician_id": "c-17", "site_id": "north",
                        "session_number": 3, "administered_at": "2026-11-25T14:05:00+00:00",
                        "items": {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8}}
    assert check_submission(row.data)[1] == []


def test_empty_cells_are_absent_so_a_total_only_row_has_no_items() -> None:
    f = parse_csv(HEADER + "\nn-2,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n")
    assert f.rows[0].data["total"] == 36.5 and "items" not in f.rows[0].data


def test_partly_filled_items_stay_partial_for_validation_to_name() -> None:
    data = parse_csv(HEADER + "\nn-3,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,9,,9,9,\n").rows[0].data
    assert data["items"] == {"relationship": 9.0, "approach": 9.0, "overall": 9.0}
    assert {f for f, _ in check_submission(data)[1]} == {"items.goals"}


def test_cells_that_are_not_numbers_are_passed_on_as_text() -> None:
    data = row_to_submission({"session_number": "three", "goals": "8,4", "total": " 3.5 "})
    assert data == {"session_number": "three", "items": {"goals": "8,4"}, "total": 3.5}


def test_rows_without_an_id_keep_it_absent_for_the_api_to_derive() -> None:
    f = parse_csv(HEADER + "\n,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n")
    assert "submission_id" not in f.rows[0].data


def test_line_numbers_count_blank_lines_and_quoted_newlines() -> None:
    text = (HEADER + "\n\n" + 'n-1,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n'
            + '"n-\n2",p-1,c-17,north,2,2026-11-25T14:05:00+00:00,,,,,36.5\n'
            + 'n-3,p-1,c-17,north,3,2026-11-25T14:05:00+00:00,,,,,36.5\n')
    assert [r.line for r in parse_csv(text).rows] == [3, 5, 6]


def test_a_row_with_the_wrong_number_of_cells_is_an_error_of_that_row() -> None:
    f = parse_csv(HEADER + "\nn-1,p-1,c-17\n")
    assert f.errors == [] and f.rows[0].errors == [(None, "row has 3 cells, the header has 11")]


def test_unknown_duplicate_and_missing_columns_reject_the_file() -> None:
    f = parse_csv("client_id,client_id,mood\n1,2,3\n")
    messages = [m for _, m in f.errors]
    assert any("unknown columns: mood" in m for m in messages)
    assert any("duplicate columns: client_id" in m for m in messages)
    assert any("missing required columns: clinician_id, site_id" in m for m in messages)
    assert any("item columns" in m for m in messages)
    assert f.rows == []


def test_column_order_is_free_and_a_bom_is_ignored() -> None:
    cols = list(reversed(COLUMNS))
    values = {"client_id": "p-1", "clinician_id": "c", "site_id": "s", "session_number": "2",
              "administered_at": "2026-11-25T14:05:00+00:00", "total": "30"}
    text = "\ufeff" + ",".join(cols) + "\n" + ",".join(values.get(c, "") for c in cols) + "\n"
    f = parse_csv(text)
    assert f.errors == [] and f.rows[0].data["total"] == 30.0 and f.rows[0].data["session_number"] == 2


def test_an_empty_file_is_an_error() -> None:
    assert parse_csv("").errors == [("header", "the file is empty: a header row is required")]


# --- ids derived from the session (what the API does for a valid row without a submission_id) -------

EXPORT = "\n".join([
    "client_id,clinician_id,site_id,episode_id,session_number,administered_at,total",
    "p-1,c-17,north,,1,2026-11-03T09:00:00+00:00,36.5",
    "p-1,c-17,north,,2,2026-11-10T09:00:00+00:00,35.0",
    "p-2,c-17,north,ep-1,1,2026-11-10T23:30:00-02:00,38.0",
]) + "\n"


def derived_ids(text: str, tenant: str = "acme") -> dict[tuple[str, int], str]:
    """What the API assigns: the id of each valid row, by (client, session number)."""
    out = {}
    for row in parse_csv(text).rows:
        model, errors = check_submission(row.data)
        assert model is not None, errors
        out[(model.client_id, model.session_number)] = _derive(tenant, model)
    return out


def _derive(tenant: str, m: SubmissionIn) -> str:
    return session_submission_id(tenant, m.client_id, m.instrument, m.episode_id, m.session_number, m.administered_at)


def test_the_same_export_imported_again_gets_the_same_ids() -> None:
    first, again = derived_ids(EXPORT), derived_ids(EXPORT)
    assert first == again and len(set(first.values())) == 3


def test_a_derived_id_is_a_valid_submission_id() -> None:
    for sid in derived_ids(EXPORT).values():
        assert sid.startswith("csv:") and len(sid) <= 128
        assert check_submission({**parse_csv(EXPORT).rows[0].data, "submission_id": sid})[1] == []


def test_a_changed_row_keeps_its_id_so_it_corrects_its_session() -> None:
    # another total, another clinician, another time of the same day: the same session
    changed = EXPORT.replace("p-1,c-17,north,,2,2026-11-10T09:00:00+00:00,35.0",
                             "p-1,c-99,north,,2,2026-11-10T16:45:00+00:00,31.2")
    assert changed != EXPORT
    assert derived_ids(changed) == derived_ids(EXPORT)


def test_reordered_rows_or_rows_in_another_file_keep_their_ids() -> None:
    header, *rows = EXPORT.strip().split("\n")
    reordered = "\n".join([header, *reversed(rows)]) + "\n"
    assert derived_ids(reordered) == derived_ids(EXPORT)
    # a later cumulative export: a new row at the top, blank lines, another column order
    later = "\n".join(["total,session_number,administered_at,site_id,clinician_id,client_id,episode_id",
                        "34.0,3,2026-11-17T09:00:00+00:00,north,c-17,p-1,", "",
                        "35.0,2,2026-11-10T09:00:00+00:00,north,c-17,p-1,",
                        "36.5,1,2026-11-03T09:00:00+00:00,north,c-17,p-1,"]) + "\n"
    ids_later = derived_ids(later)
    assert ids_later[("p-1", 1)] == derived_ids(EXPORT)[("p-1", 1)]
    assert ids_later[("p-1", 2)] == derived_ids(EXPORT)[("p-1", 2)]


def test_rows_of_two_tenants_never_share_an_id() -> None:
    acme, globex = derived_ids(EXPORT, "acme"), derived_ids(EXPORT, "globex")
    assert not set(acme.values()) & set(globex.values())


def test_every_part_of_the_session_identity_changes_the_id() -> None:
    when = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)

    def sid(tenant: str = "acme", client: str = "p-1", instrument: str = "SRS", episode: str | None = None,
            number: int = 2, at: datetime = when) -> str:
        return session_submission_id(tenant, client, instrument, episode, number, at)

    variants = [sid(), sid(tenant="globex"), sid(client="p-2"), sid(instrument="CSRS"), sid(episode="ep-1"),
                sid(number=3), sid(at=when.replace(day=11))]
    assert len(set(variants)) == len(variants)
    # an empty episode cell is no episode; another time of the same UTC day is the same session
    assert sid(episode="") == sid() == sid(at=when.replace(hour=23, minute=59))


def test_the_date_is_the_utc_calendar_date_of_administered_at() -> None:
    late_evening_west = datetime.fromisoformat("2026-11-10T23:30:00-02:00")  # 2026-11-11 in UTC
    assert (session_submission_id("acme", "p-1", "SRS", None, 2, late_evening_west)
            == session_submission_id("acme", "p-1", "SRS", None, 2, datetime(2026, 11, 11, 8, 0, tzinfo=UTC)))
    assert (session_submission_id("acme", "p-1", "SRS", None, 2, late_evening_west)
            != session_submission_id("acme", "p-1", "SRS", None, 2, datetime(2026, 11, 10, 8, 0, tzinfo=UTC)))


def test_rows_can_be_written_back_as_a_file_of_their_own() -> None:
    f = parse_csv(HEADER + '\n"n,1",p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n'
                  + "n-2,p-2,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,30\n")
    again: CsvFile = parse_csv(to_csv(f.header, f.rows[1:]))
    assert [r.data for r in again.rows] == [f.rows[1].data]
    assert parse_csv(to_csv(f.header, f.rows)).rows[0].data["submission_id"] == "n,1"


# --- ORS rows (docs/outcome.md): a file may mix both scales, each row fills its own item columns ------

MIXED = "\n".join([
    "instrument,client_id,clinician_id,site_id,session_number,administered_at,client_age,"
    "individually,interpersonally,socially,relationship,goals,approach,overall,total",
    "ORS,p-1,c-17,north,3,2026-11-25T13:10:00+00:00,34,5.2,6.0,5.8,,,,5.5,",
    "SRS,p-1,c-17,north,3,2026-11-25T14:05:00+00:00,,,,,9.1,8.4,9.0,8.8,",
    "CORS,p-2,c-17,north,1,2026-11-25T14:10:00+00:00,9,,,,,,,,18.0",
]) + "\n"


def test_a_mixed_file_gives_each_row_the_items_of_its_own_instrument() -> None:
    ors_row, srs_row, total_row = (r.data for r in parse_csv(MIXED).rows)
    assert ors_row["items"] == {"individually": 5.2, "interpersonally": 6.0, "socially": 5.8, "overall": 5.5}
    assert ors_row["client_age"] == 34
    assert srs_row["items"] == {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8}
    assert "client_age" not in srs_row
    assert (total_row["total"], total_row["client_age"], "items" in total_row) == (18.0, 9, False)
    assert [check_submission(r.data)[1] for r in parse_csv(MIXED).rows] == [[], [], []]


def test_an_ors_row_filling_srs_item_cells_is_refused_naming_those_columns() -> None:
    text = MIXED.replace("ORS,p-1,c-17,north,3,2026-11-25T13:10:00+00:00,34,5.2,6.0,5.8,,,,5.5,",
                         "ORS,p-1,c-17,north,3,2026-11-25T13:10:00+00:00,34,5.2,6.0,5.8,7.0,,,5.5,")
    _, errors = check_submission(parse_csv(text).rows[0].data)
    assert [f for f, _ in errors] == ["items.relationship"]


def test_a_header_with_only_the_ors_item_columns_is_enough() -> None:
    f = parse_csv("instrument,client_id,clinician_id,site_id,session_number,administered_at,"
                  "individually,interpersonally,socially,overall\nORS,p-1,c,s,1,2026-11-25T13:10:00+00:00,1,2,3,4\n")
    assert f.errors == [] and check_submission(f.rows[0].data)[1] == []


def test_a_client_age_that_is_not_a_whole_number_is_passed_on_for_validation_to_name() -> None:
    assert row_to_submission({"client_age": "15.5"}) == {"client_age": "15.5"}


def test_the_ors_and_the_srs_of_one_session_get_different_derived_ids_stable_across_imports() -> None:
    def ids_of(text: str) -> list[str]:
        models = [check_submission(r.data)[0] for r in parse_csv(text).rows]
        return [_derive("acme", m) for m in models if m is not None]

    first = ids_of(MIXED)
    assert len(set(first)) == 3 and first == ids_of(MIXED)
