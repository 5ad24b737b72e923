"""`python -m services.scoring`: run the scoring service (consumer + ops HTTP on :8002)."""

from __future__ import annotations

from services.scoring.app import create_app
from shared.http import serve
from shared.settings import ScoringHttp


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    http = ScoringHttp()
    serve("scoring", create_app(), http.host, http.port)


if __name__ == "__main__":
    main()
