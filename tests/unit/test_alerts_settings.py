"""Settings of the alerts service: defaults from the issue, environment names, invalid combinations."""

from __future__ import annotations

import base64
from pathlib import Path

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


# ---- the secrets keyring (issue 12, item 6) -------------------------------------------------------

GOOD_KEYRING = "k1:" + base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize("placeholder", ["change-me", "k1:change-me", "k1:" + base64.b64encode(b"short").decode(),
                                         "k1:" + base64.b64encode(bytes(32)).decode()])
def test_a_placeholder_short_or_non_random_key_is_refused_naming_the_setting(placeholder: str) -> None:
    with pytest.raises(ValidationError, match="ALLIANCE_ALERTS_SECRETS_KEYS"):
        AlertsSettings(secrets_keys=placeholder)  # type: ignore[arg-type]


def test_production_mode_refuses_to_start_without_a_keyring() -> None:
    with pytest.raises(ValidationError, match="ALLIANCE_ALERTS_SECRETS_KEYS is empty"):
        AlertsSettings(production=True)
    assert AlertsSettings(production=True, secrets_keys=GOOD_KEYRING).secret_box().encrypting  # type: ignore[arg-type]


def test_outside_production_no_keyring_means_plain_storage() -> None:
    assert AlertsSettings().secret_box().encrypting is False


def test_the_retired_single_key_setting_is_refused_with_the_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_ALERTS_SECRETS_KEY", "change-me")
    with pytest.raises(ValidationError, match=r"ALLIANCE_ALERTS_SECRETS_KEY is no longer read.*reseal"):
        AlertsSettings()


def test_the_keyring_can_come_from_a_file_that_the_cli_writes_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from services.alerts import cli

    path = tmp_path / "keys"
    assert CliRunner().invoke(cli.app, ["secrets", "new-key", "--id", "c1", "--file", str(path)]).exit_code == 0
    first = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert CliRunner().invoke(cli.app, ["secrets", "new-key", "--id", "c2", "--file", str(path)]).exit_code == 0
    assert path.read_text() == first  # an existing keyring is never replaced
    box = AlertsSettings(production=True, secrets_keys_file=str(path)).secret_box()
    assert box.sealing_key_id == "c1"
    with pytest.raises(ValidationError, match="SECRETS_KEYS_FILE"):
        AlertsSettings(secrets_keys_file=str(tmp_path / "missing"))
