"""`python -m services.scoring`: run the scoring service (consumer + ops HTTP on :8002)."""

from __future__ import annotations

import gc

from services.scoring.app import create_app
from services.scoring.settings import ScoringSettings
from shared.http import serve
from shared.settings import ScoringHttp


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    young = ScoringSettings().gc_young_threshold
    if young:  # process-wide, so here and not in `build` (tests build the service in-process)
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young, older, oldest)
    http = ScoringHttp()
    serve("scoring", create_app, http.host, http.port)


if __name__ == "__main__":
    main()
