"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure functions.

A receiver verifies `webhook-signature` = `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`
with the secret `whsec_<base64 key>` it was given, using any off-the-shelf library. During a
secret rotation the header carries one signature per valid secret, separated by spaces, which
the specification allows; a receiver holding either secret accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
USER_AGENT = "alliance-stream-alerts/1"


def new_secret() -> str:
    """A fresh signing secret (256-bit key) in the `whsec_<base64>` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key inside a `whsec_...` secret."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc
    if not key:
        raise ValueError("empty webhook secret")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(delivery_id: str, timestamp: int, body: bytes, signing_secrets: Sequence[str],
                    event_topic: str) -> dict[str, str]:
    """Every header of one webhook attempt.

    `webhook-id` is the delivery id, stable across retries (receivers dedupe on it);
    `webhook-timestamp` is the attempt's time, so a retry has a fresh, verifiable timestamp.
    """
    if not signing_secrets:
        raise ValueError("at least one signing secret is needed")
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, delivery_id, timestamp, body) for s in signing_secrets),
        "x-alliance-event": event_topic,
        "x-alliance-delivery": delivery_id,
    }
