"""`python -m services.intake`: run the intake service."""

from __future__ import annotations

from services.intake.app import create_app
from shared.http import serve
from shared.settings import IntakeHttp


def main() -> None:
    http = IntakeHttp()
    serve("intake", create_app, http.host, http.port)


if __name__ == "__main__":
    main()
