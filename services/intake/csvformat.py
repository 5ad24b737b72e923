"""The CSV format of EHR exports (pure: text in, submission dicts out).

A header row names the columns; the order is free, names are case-sensitive:

| column           | required | content                                                   |
|------------------|----------|-----------------------------------------------------------|
| `submission_id`  | no       | idempotency key; when empty, derived from the session     |
|                  |          | (see below)                                               |
| `instrument`     | no       | SRS (default), CSRS, GSRS, CGSRS, YCSRS; or an outcome    |
|                  |          | rating: ORS, CORS, YCORS (docs/outcome.md)                |
| `client_id`      | yes      | pseudonymous client id                                    |
| `clinician_id`   | yes      |                                                           |
| `site_id`        | yes      |                                                           |
| `episode_id`     | no       |                                                           |
| `session_number` | yes      | integer >= 1                                              |
| `administered_at`| yes      | ISO-8601 with offset, e.g. `2026-11-25T14:05:00+00:00`    |
| `relationship`, `goals`, `approach`, `overall` | items | SRS family: 0.0-10.0, one decimal |
| `individually`, `interpersonally`, `socially`, `overall` | items | ORS family: the same scale |
| `total`          | or total | 0.0-40.0, one decimal                                     |
| `client_age`     | no       | ORS family only: whole years, 0-130                       |

An empty cell means "absent". A row gives all four item cells of its instrument or a `total`,
never both. One file may mix SRS and ORS rows: each row fills in the item columns of its own
instrument (`overall` is an item of both) and leaves the other scale's cells empty; an item of
the other scale, or a `client_age` on an SRS row, is refused naming that cell's column. Rows are
validated by exactly the rules of `POST /v1/submissions` (see `services.intake.models`); the report
names each rejected row by its line number in the file (the header is line 1).

A valid row without a `submission_id` gets `csv:<uuid>`, a UUIDv5 of its session: the tenant (of
the API key), `client_id`, `instrument` (SRS when empty; an ORS row and the SRS row of the same
session therefore get different ids), `episode_id` (or none), `session_number`
and the UTC calendar date of `administered_at`. So re-importing the same cumulative export changes
nothing, the same row in another file or at another line keeps its id, and a row whose ratings
changed is a correction of that session (docs/clinical-records.md). Two rows of one request with
the same session get the same id and are accepted together: which one counts is then decided by
the rule for equal acceptance times (a digest of the content), not by their order in the file. A
rejected row without a `submission_id` is reported with `submission_id: null` (its line names it).

Example:

    submission_id,client_id,clinician_id,site_id,session_number,administered_at,relationship,goals,approach,overall,total
    n-1,p-8812,c-17,north,3,2026-11-25T14:05:00+00:00,9.1,8.4,9.0,8.8,
    n-2,p-9001,c-17,north,1,2026-11-25T15:00:00+00:00,,,,,36.5

A file with both scales of each session (the ORS at the start, the SRS at the end):

    instrument,client_id,clinician_id,site_id,session_number,administered_at,client_age,individually,interpersonally,socially,relationship,goals,approach,overall,total
    ORS,p-8812,c-17,north,3,2026-11-25T13:10:00+00:00,34,5.2,6.0,5.8,,,,5.5,
    SRS,p-8812,c-17,north,3,2026-11-25T14:05:00+00:00,,,,,9.1,8.4,9.0,8.8,
    ORS,p-9001,c-17,north,1,2026-11-25T14:10:00+00:00,15,,,,,,,,18.0
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared import ids
from shared.events import ITEM_NAMES, ORS_ITEM_NAMES

# The item columns of both scales (`overall` is an item of each); a row's instrument says which it fills.
ALL_ITEM_NAMES: tuple[str, ...] = (*ITEM_NAMES, *(n for n in ORS_ITEM_NAMES if n not in ITEM_NAMES))
COLUMNS: tuple[str, ...] = ("submission_id", "instrument", "client_id", "clinician_id", "site_id", "episode_id",
                            "session_number", "administered_at", "client_age", *ALL_ITEM_NAMES, "total")
REQUIRED: tuple[str, ...] = ("client_id", "clinician_id", "site_id", "session_number", "administered_at")
_INT = re.compile(r"^[+-]?\d{1,18}$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

FieldError = tuple[str | None, str]


@dataclass
class CsvRow:
    """One data row: its line number in the file and the submission it describes."""

    line: int
    data: dict[str, Any]
    errors: list[FieldError] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)


@dataclass
class CsvFile:
    """A parsed file: its rows, or the errors that make the whole file unusable."""

    rows: list[CsvRow]
    errors: list[FieldError]
    header: list[str] = field(default_factory=list)
    # True when parsing stopped at `max_rows + 1` data rows: the file is over the limit, and how
    # far over is not worth reading to find out.
    too_many_rows: bool = False


def _number(cell: str, integer: bool) -> Any:
    # A cell that does not look like a number is passed on as text, so validation names the rule.
    if integer:
        return int(cell) if _INT.match(cell) else cell
    return float(cell) if _NUMBER.match(cell) else cell


def row_to_submission(cells: dict[str, str]) -> dict[str, Any]:
    """A CSV row (column -> cell text) as a submission object; empty cells are absent."""
    out: dict[str, Any] = {}
    items: dict[str, Any] = {}
    for name, raw in cells.items():
        cell = raw.strip()
        if not cell:
            continue
        if name in ALL_ITEM_NAMES:
            items[name] = _number(cell, integer=False)
        elif name == "total":
            out[name] = _number(cell, integer=False)
        elif name in ("session_number", "client_age"):
            out[name] = _number(cell, integer=True)
        else:
            out[name] = cell
    if items:
        out["items"] = items
    return out


def session_submission_id(tenant_id: str, client_id: str, instrument: str, episode_id: str | None,
                          session_number: int, administered_at: datetime) -> str:
    """The id of a row without one, derived from its session: the same session always gets the same id,
    whatever file or line it comes from; sessions of two tenants never share one. Takes validated
    values (e.g. `SubmissionIn` fields), so `+01:00` and `Z` times of one UTC day agree."""
    day = administered_at.astimezone(UTC).date().isoformat()
    return ids.csv_submission_id(tenant_id, client_id, instrument, episode_id, session_number, day)


def parse_csv(text: str, max_rows: int | None = None, max_row_chars: int | None = None) -> CsvFile:
    """Parse an export. Rows keep the `submission_id` they give; the API derives the others
    (`session_submission_id`) once a row is valid.

    The file is read as a stream of rows, and the limits are checked on each row's cells before a
    row object is built: parsing stops at the first data row past `max_rows` (`too_many_rows`)
    and at the first row whose cells hold more than `max_row_chars` characters (a file error). So
    refusing an oversize file costs the rows up to the limit, never the whole file (a 4 MiB file
    of tiny rows built every row, ~1 GiB, before the API looked at the count).
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    header: list[str] | None = None
    rows: list[CsvRow] = []
    try:
        for cells in reader:
            if max_row_chars is not None and sum(map(len, cells)) > max_row_chars:
                return CsvFile([], [(None, f"line {reader.line_num}: a row may hold at most {max_row_chars} "
                                           "characters")], header or [])
            if header is None:
                header = [c.strip() for c in cells]
                errors = _header_errors(header)
                if errors:
                    return CsvFile([], errors, header)
                continue
            if not any(c.strip() for c in cells):
                continue  # blank line
            if max_rows is not None and len(rows) >= max_rows:
                return CsvFile(rows, [], header, too_many_rows=True)
            line = reader.line_num
            if len(cells) != len(header):
                rows.append(CsvRow(line, {}, [(None, f"row has {len(cells)} cells, the header has {len(header)}")],
                                   cells))
                continue
            rows.append(CsvRow(line, row_to_submission(dict(zip(header, cells, strict=True))), [], cells))
    except csv.Error as exc:
        return CsvFile(rows, [(None, f"line {reader.line_num}: {exc}")], header or [])
    if header is None:
        return CsvFile([], [("header", "the file is empty: a header row is required")])
    return CsvFile(rows, [], header)


def to_csv(header: list[str], rows: list[CsvRow]) -> str:
    """Rows of a parsed file as a file of their own (same header), e.g. to send a large file in chunks."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(r.cells for r in rows)
    return out.getvalue()


def _header_errors(header: list[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        errors.append(("header", f"unknown columns: {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}"))
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        errors.append(("header", f"duplicate columns: {', '.join(dupes)}"))
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        errors.append(("header", f"missing required columns: {', '.join(missing)}"))
    if "total" not in header and not any(all(i in header for i in names) for names in (ITEM_NAMES, ORS_ITEM_NAMES)):
        errors.append(("header", f"needs the item columns of a scale (SRS: {', '.join(ITEM_NAMES)}; ORS: "
                                 f"{', '.join(ORS_ITEM_NAMES)}) or a total column"))
    return errors
