"""Settings of the alerts service: defaults from the issue, environment names, invalid combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.alerts.settings import AlertsSettings, SmtpSettings


def test_retry_defaults_are_one_second_to_five_minutes_eight_attempts_five_second_timeout() -> None:
    s = AlertsSettings()
    assert (s.retry_first_seconds, s.retry_max_seconds, s.max_attempts, s.attempt_timeout_seconds) == (
        1.0, 300.0, 8, 5.0)
    assert s.allow_private_targets is False
    assert s.dashboard_url == "http://127.0.0.1:8004/dashboard"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_ALERTS_ALLOW_PRIVATE_TARGETS", "true")
    monkeypatch.setenv("ALLIANCE_ALERTS_ESCALATION_SECONDS", "60")
    monkeypatch.setenv("ALLIANCE_SMTP_HOST", "mail.example.org")
    monkeypatch.setenv("ALLIANCE_SMTP_FROM", "alerts@example.org")
    monkeypatch.setenv("ALLIANCE_SMTP_STARTTLS", "true")
    a, m = AlertsSettings(), SmtpSettings()
    assert a.allow_private_targets and a.escalation_seconds == 60
    assert (m.host, m.sender, m.starttls, m.enabled) == ("mail.example.org", "alerts@example.org", True, True)


def test_email_is_off_without_an_smtp_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALLIANCE_SMTP_HOST", raising=False)
    assert SmtpSettings().enabled is False


def test_a_lease_shorter_than_an_attempt_is_refused() -> None:
    with pytest.raises(ValidationError, match="lease_seconds"):
        AlertsSettings(lease_seconds=5, attempt_timeout_seconds=5)


def test_tls_and_starttls_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        SmtpSettings(tls=True, starttls=True)
