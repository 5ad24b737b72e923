"""`python -m services.alerts`: run the alerts service (HTTP on ALLIANCE_ALERTS_PORT, default 8003)."""

import sys

from services.alerts.app import AlertsConfig, create_app
from services.alerts.settings import start_refusal
from shared.http import serve
from shared.settings import AlertsHttp


def main() -> None:
    http = AlertsHttp()
    config = AlertsConfig()
    if (refusal := start_refusal(config.alerts)) is not None:
        # Before anything starts: the process exits non-zero and says why (issue 12, item 6).
        sys.exit(f"alerts: not starting: {refusal}")
    serve("alerts", lambda: create_app(config), http.host, http.port)


if __name__ == "__main__":
    main()
