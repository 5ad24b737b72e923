"""Settings of the alerts service (`ALLIANCE_ALERTS_*`) and of its SMTP adapter (`ALLIANCE_SMTP_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.alerts.secretbox import KEYS_SETTING, SecretBox, parse_keyring


class AlertsSettings(BaseSettings):
    """Delivery, escalation and target-validation knobs (`ALLIANCE_ALERTS_*`)."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_ALERTS_", extra="ignore")

    # Webhook targets on loopback/private/link-local addresses are refused unless this is on
    # (local runs and tests deliver to 127.0.0.1); it protects the internal network from SSRF.
    allow_private_targets: bool = False
    dashboard_url: str = "http://127.0.0.1:8004/dashboard"

    # Retry schedule: attempt n (1-based) that fails waits min(max, first * 2**(n-1)), jittered.
    retry_first_seconds: PositiveFloat = 1.0
    retry_max_seconds: PositiveFloat = 300.0
    max_attempts: PositiveInt = 8
    attempt_timeout_seconds: PositiveFloat = 5.0
    # A claimed delivery is invisible to other workers until the lease ends; it must outlast one
    # attempt (timeout) plus recording it, or a slow process could see its delivery re-sent.
    lease_seconds: PositiveFloat = 30.0
    concurrency: PositiveInt = 32
    # At most this many of those attempts belong to one tenant (fewer when several tenants have
    # work: an equal split), so one tenant's slow endpoints never hold every slot.
    tenant_concurrency: PositiveInt = 8
    # Partner subscriptions one tenant may have (each is a delivery per event: many slow ones
    # would otherwise be cheap to create and costly to serve).
    max_subscriptions_per_tenant: NonNegativeInt = 20
    # How much of a webhook receiver's answer is read (only its status matters).
    response_body_max_bytes: NonNegativeInt = 4096
    # How often a worker looks for due deliveries when nothing woke it (other processes' work, retries).
    poll_seconds: PositiveFloat = 1.0
    gauge_seconds: PositiveFloat = 5.0
    # A clinician's `delivered` / `failed` status is published right after its delivery is recorded;
    # one still owed this long after (a crash, a broker outage) is published by a sweep that runs
    # this often (services/alerts/statuses.py). Rerouting looks again, this often, at directory entries
    # put this long ago whose stranded alerts are still owed a look (services/alerts/reroute.py).
    status_sweep_seconds: PositiveFloat = 30.0
    # How long each tenant's partner subscriptions to a topic are kept between store reads (every
    # consumed batch needs them). A change through this process is seen at once; another alerts
    # process's within this time (docs/partners.md). 0 reads the store for every batch.
    subscription_cache_seconds: NonNegativeFloat = 5.0

    escalation_seconds: PositiveFloat = 24 * 3600.0
    escalation_check_seconds: PositiveFloat = 30.0

    # Keyring that encrypts stored signing secrets: `id:base64key,...` (32 random bytes each; the
    # first seals, all open; see secretbox). Empty = stored unencrypted, which only a non-production
    # process accepts. Malformed, short or placeholder keys are refused in every mode.
    secrets_keys: SecretStr = SecretStr("")
    # Or a file holding that keyring (compose generates one into a volume; a mounted k8s Secret
    # works too). Read when `secrets_keys` is empty.
    secrets_keys_file: str = ""
    # The retired single-key setting: refused (not silently reinterpreted), see the validator.
    secrets_key: SecretStr = SecretStr("")
    # The alerts process refuses to start without a keyring unless this is on (`start_refusal`):
    # only the local run command (`alliance run`), the benches and the test kit turn it on, so a
    # deployment that forgot the key fails loudly instead of storing partners' secrets in plain text.
    dev_mode: bool = False
    # Kept from before the guard became the default (compose and k8s still set it): with it, even a
    # settings object without a keyring is refused, and it contradicts dev mode.
    production: bool = False
    # How long a rotated clinician-webhook secret still signs alongside the new one.
    secret_rotation_grace_seconds: NonNegativeFloat = 24 * 3600.0

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> AlertsSettings:
        if self.lease_seconds <= self.attempt_timeout_seconds:
            raise ValueError("lease_seconds must be longer than attempt_timeout_seconds")
        return self

    @model_validator(mode="after")
    def _a_usable_keyring(self) -> AlertsSettings:
        if self.secrets_key.get_secret_value():
            raise ValueError("ALLIANCE_ALERTS_SECRETS_KEY is no longer read: set ALLIANCE_ALERTS_SECRETS_KEYS="
                             "<id>:<base64 of 32 bytes> (`alliance alerts secrets new-key`), unset the old "
                             "setting, and migrate stored values with `alliance alerts secrets reseal "
                             "--legacy-key <old value>`")
        if not self.secrets_keys.get_secret_value() and self.secrets_keys_file:
            try:
                self.secrets_keys = SecretStr(Path(self.secrets_keys_file).read_text().strip())
            except OSError as exc:
                raise ValueError(f"ALLIANCE_ALERTS_SECRETS_KEYS_FILE cannot be read: {exc}") from None
        ring = parse_keyring(self.secrets_keys.get_secret_value())
        if self.production and self.dev_mode:
            raise ValueError("ALLIANCE_ALERTS_PRODUCTION and ALLIANCE_ALERTS_DEV_MODE are both on: choose one")
        if self.production and not ring:
            raise ValueError(f"{KEYS_SETTING} is empty and ALLIANCE_ALERTS_PRODUCTION is on: production "
                             "refuses to store webhook signing secrets unencrypted")
        return self

    def secret_box(self) -> SecretBox:
        return SecretBox(parse_keyring(self.secrets_keys.get_secret_value()))


def start_refusal(settings: AlertsSettings) -> str | None:
    """Why the alerts process must not start with `settings`, or None. Malformed, short and
    placeholder keys are refused by the settings themselves; here a missing keyring is refused
    unless dev mode says this is a local run (where plain-text secrets are acceptable)."""
    if settings.dev_mode or settings.secret_box().encrypting:
        return None
    return (f"{KEYS_SETTING} is empty: alerts refuses to store webhook signing secrets unencrypted. Set it "
            "(or ALLIANCE_ALERTS_SECRETS_KEYS_FILE) to a keyring from `alliance secrets new-key --id <id>`; "
            "only a local run may set ALLIANCE_ALERTS_DEV_MODE=true instead")


class SmtpSettings(BaseSettings):
    """The mail relay (`ALLIANCE_SMTP_*`). An empty host turns the email channel off."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_SMTP_", extra="ignore", populate_by_name=True)

    host: str = ""
    port: int = 25
    # starttls=true requires STARTTLS; false uses it only when the server offers it.
    starttls: bool = False
    # tls=true speaks TLS from the first byte (SMTPS, usually port 465).
    tls: bool = False
    username: str = ""
    password: SecretStr = SecretStr("")
    sender: str = Field(default="alerts@alliance.invalid", validation_alias="ALLIANCE_SMTP_FROM")

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @model_validator(mode="after")
    def _one_tls_mode(self) -> SmtpSettings:
        if self.tls and self.starttls:
            raise ValueError("set ALLIANCE_SMTP_TLS or ALLIANCE_SMTP_STARTTLS, not both")
        return self
