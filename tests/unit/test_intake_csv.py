"""The CSV format of EHR exports: columns, empty cells, line numbers, derived submission ids."""

from __future__ import annotations

from services.intake.csvformat import COLUMNS, default_submission_id, parse_csv, row_to_submission
from services.intake.models import check_submission

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


def test_rows_without_an_id_get_one_derived_from_the_file_and_line() -> None:
    text = HEADER + "\n,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n"
    a, b = parse_csv(text), parse_csv(text)
    assert a.rows[0].data["submission_id"] == b.rows[0].data["submission_id"] == default_submission_id(a.digest, 2)
    other = parse_csv(text.replace("36.5", "36.0"))
    assert other.rows[0].data["submission_id"] != a.rows[0].data["submission_id"]
    assert check_submission(a.rows[0].data)[1] == []  # the derived id is a valid id


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
