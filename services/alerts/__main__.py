"""`python -m services.alerts`: run the alerts service (HTTP on ALLIANCE_ALERTS_PORT, default 8003)."""

from services.alerts.app import create_app
from shared.http import serve
from shared.settings import AlertsHttp


def main() -> None:
    http = AlertsHttp()
    serve("alerts", create_app(), http.host, http.port)


if __name__ == "__main__":
    main()
