"""Standard Webhooks signatures, verified with the off-the-shelf `standardwebhooks` package."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.alerts import signing

BODY = b'{"alert_id":"a1","client_id":"c\xc3\xa9"}'


def test_new_secret_is_whsec_with_a_256_bit_key() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:])) == 32
    assert signing.new_secret() != secret


def test_headers_verify_with_the_standardwebhooks_library() -> None:
    secret = signing.new_secret()
    headers = signing.webhook_headers("d-1", int(time.time()), BODY, [secret], "alliance.deterioration.v1")
    assert Webhook(secret).verify(BODY, headers) == {"alert_id": "a1", "client_id": "cé"}
    assert headers["webhook-id"] == headers["x-alliance-delivery"] == "d-1"
    assert headers["x-alliance-event"] == "alliance.deterioration.v1"


def test_a_different_secret_does_not_verify() -> None:
    headers = signing.webhook_headers("d-1", int(time.time()), BODY, [signing.new_secret()], "t")
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(BODY, headers)


def test_a_changed_body_does_not_verify() -> None:
    secret = signing.new_secret()
    headers = signing.webhook_headers("d-1", int(time.time()), BODY, [secret], "t")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"a1", b"a2"), headers)


def test_during_rotation_both_secrets_verify() -> None:
    new, old = signing.new_secret(), signing.new_secret()
    headers = signing.webhook_headers("d-1", int(time.time()), BODY, [new, old], "t")
    assert headers["webhook-signature"].count("v1,") == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)


def test_signature_matches_the_specification_example() -> None:
    # The example of the Standard Webhooks specification (and of its reference libraries).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    sig = signing.signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_no_secret_means_no_headers() -> None:
    with pytest.raises(ValueError):
        signing.webhook_headers("d", 1, BODY, [], "t")
