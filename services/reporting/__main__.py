"""`python -m services.reporting`: the reporting service (consumers, read API, dashboard)."""

from __future__ import annotations

from services.reporting.app import create_app
from shared.http import serve
from shared.settings import ReportingHttp


def main() -> None:
    http = ReportingHttp()
    serve("reporting", create_app, http.host, http.port)


if __name__ == "__main__":
    main()
