"""Standard Webhooks signatures, verified with the off-the-shelf `standardwebhooks` package."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.alerts import signing
from services.alerts.secretbox import SecretBox

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


def test_secretbox_round_trip_and_ciphertext_hides_the_secret() -> None:
    box = SecretBox("a passphrase")
    secret = signing.new_secret()
    sealed = box.seal(secret)
    assert secret not in sealed and sealed.startswith("sb1:")
    assert box.open(sealed) == secret
    assert box.seal(secret) != sealed  # fresh nonce


def test_secretbox_rejects_tampering_and_wrong_keys() -> None:
    sealed = SecretBox("k1").seal("whsec_abc")
    raw = bytearray(base64.b64decode(sealed[4:]))
    raw[20] ^= 1
    with pytest.raises(ValueError):
        SecretBox("k1").open("sb1:" + base64.b64encode(bytes(raw)).decode())
    with pytest.raises(ValueError):
        SecretBox("k2").open(sealed)
    with pytest.raises(ValueError):
        SecretBox("").open(sealed)


def test_secretbox_without_key_stores_plain_and_opens_it_after_a_key_is_set() -> None:
    sealed = SecretBox("").seal("whsec_abc")
    assert sealed == "plain:whsec_abc"
    assert SecretBox("now-a-key").open(sealed) == "whsec_abc"
