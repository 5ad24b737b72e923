"""The two channels: signed webhooks over HTTP (httpx) and plain-text email over SMTP (aiosmtplib).

A sender makes exactly one attempt and raises `SendError` (retryable) or `Cancelled` (the
recipient no longer exists); the worker owns timeouts, retries and recording.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

import aiosmtplib
import httpx

from services.alerts import signing
from services.alerts.rules import Outcome, email_text, kind_of_topic, status_outcome, url_problem, withdrawal_email_text
from services.alerts.secretbox import SecretBox, subscription_row, tenant_row
from services.alerts.settings import SmtpSettings
from services.alerts.store import AlertsStore
from services.alerts.targets import EgressBlocked, PinnedTransport, Resolver, system_resolve
from shared.mongo import Document, TtlCache


class SendError(Exception):
    """An attempt failed; it may succeed later.

    The message is for operators (logs, the CLI, dead letters); tenants see only `outcome`."""

    def __init__(self, message: str, status: int | None = None, outcome: Outcome = "error") -> None:
        super().__init__(message)
        self.status = status
        self.outcome: Outcome = outcome


class Cancelled(Exception):
    """The delivery has no recipient any more (e.g. its subscription was deleted)."""


class SigningSecrets:
    """Looks up (and briefly caches) the secrets a delivery is signed with.

    The cache is short so that a rotation or deletion takes effect within seconds in every
    process, while a burst of deliveries costs one lookup.
    """

    def __init__(self, store: AlertsStore, box: SecretBox, ttl_seconds: float = 5.0) -> None:
        self._store = store
        self._box = box
        self._cache: TtlCache[str, list[str] | None] = TtlCache(ttl_seconds)

    async def _cached(self, key: str, load: Callable[[], Awaitable[list[str] | None]]) -> list[str] | None:
        if (hit := self._cache.fresh(key)) is not None:
            return hit.value
        value = await load()
        self._cache.put(key, value)
        return value

    async def for_delivery(self, d: Document) -> list[str] | None:
        """The secrets to sign with; None when the recipient is gone; [] when none is configured."""
        sub = d.get("subscription_id")
        tenant_id = str(d["tenant_id"])
        if sub:
            async def load_sub() -> list[str] | None:
                sealed = await self._store.subscription_secret(sub)
                return None if sealed is None else [self._box.open(sealed, subscription_row(tenant_id, sub))]
            return await self._cached("sub:" + sub, load_sub)


        async def load_tenant() -> list[str] | None:
            doc = await self._store.tenant(tenant_id) or {}
            out = [self._box.open(doc["webhook_secret"], tenant_row(tenant_id))] if doc.get("webhook_secret") else []
            until = doc.get("previous_until")
            if out and doc.get("previous_secret") and until is not None and until > datetime.now(UTC):
                out.append(self._box.open(doc["previous_secret"], tenant_row(tenant_id)))
            return out
        return await self._cached("tenant:" + tenant_id, load_tenant)

    def forget(self, key: str) -> None:
        self._cache.pop(key)


# How much of a receiver's answer is read: only the status matters, and a receiver must not be
# able to make an attempt read (or hold memory for) a large body.
RESPONSE_BODY_MAX_BYTES = 4096


class WebhookSender:
    """POSTs the event JSON, signed per Standard Webhooks; any 2xx is success.

    Egress rules (see targets): each connection goes to an address vetted from one resolution
    of the target's name (no second lookup to rebind), redirects are not followed (a 3xx could
    point anywhere), and at most `body_max_bytes` of an answer are read."""

    def __init__(self, secrets: SigningSecrets, allow_private: bool, timeout_seconds: float,
                 resolve: Resolver = system_resolve, body_max_bytes: int = RESPONSE_BODY_MAX_BYTES) -> None:
        self._secrets = secrets
        self._body_max = body_max_bytes
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self._client = httpx.AsyncClient(timeout=timeout_seconds, follow_redirects=False, trust_env=False,
                                         transport=PinnedTransport(resolve, allow_private, limits))

    async def send(self, d: Document) -> int:
        signing_secrets = await self._secrets.for_delivery(d)
        if signing_secrets is None:
            raise Cancelled("the subscription was deleted")
        if not signing_secrets:
            raise SendError("the tenant has no webhook signing secret (an admin creates one: POST /v1/webhook-secret)",
                            outcome="no_secret")
        url = str(d["target"])
        if (problem := url_problem(url)) is not None:
            raise SendError(f"target refused: {problem}", outcome="blocked")
        body = str(d["body"]).encode()
        headers = signing.webhook_headers(str(d["_id"]), int(time.time()), body, signing_secrets, str(d["topic"]))
        if d.get("kind") == "escalation":
            headers["x-alliance-escalation"] = "true"
        if reason := d.get("routed_reason"):  # a site fallback's copy: why the clinician was not reached
            headers["x-alliance-routed"] = "fallback"
            headers["x-alliance-routed-reason"] = str(reason)
        try:
            async with self._client.stream("POST", url, content=body, headers=headers) as response:
                status = response.status_code
                await self._drain(response)
        except EgressBlocked as exc:
            raise SendError(f"target refused: {exc}", outcome="blocked") from exc
        except httpx.TimeoutException as exc:
            raise SendError(f"timeout: {type(exc).__name__}", outcome="timeout") from exc
        except httpx.HTTPError as exc:
            raise SendError(f"transport error: {type(exc).__name__}: {exc}", outcome="refused") from exc
        if not 200 <= status < 300:
            raise SendError(f"HTTP {status}", status, status_outcome(status))
        return status

    async def _drain(self, response: httpx.Response) -> None:
        """Read at most `body_max_bytes` of the answer (a short body read to its end lets the
        connection be reused; a longer one is cut off and its connection closed)."""
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= self._body_max:
                break

    async def close(self) -> None:
        await self._client.aclose()


class EmailSender:
    """Sends the plain-text alert (or withdrawal) email through the configured SMTP relay."""

    def __init__(self, smtp: SmtpSettings, dashboard_url: str, timeout_seconds: float) -> None:
        self._smtp = smtp
        self._dashboard = dashboard_url
        self._timeout = timeout_seconds

    def message(self, d: Document) -> EmailMessage:
        topic = str(d.get("topic"))
        kind = kind_of_topic(topic)
        reason = d.get("routed_reason")  # set on a site fallback's copy
        if topic == kind.status:  # a withdrawal; the body is the status event
            subject, text = withdrawal_email_text(kind.status_model().model_validate_json(d["body"]),
                                                  self._dashboard, kind, routed_reason=reason)
        else:
            alert = kind.raised_model().model_validate_json(d["body"])
            subject, text = email_text(alert, self._dashboard, escalation=d.get("kind") == "escalation",
                                       routed_reason=reason)
        msg = EmailMessage()
        msg["From"] = self._smtp.sender
        msg["To"] = str(d["target"])
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        # The same Message-ID on every retry: mail systems can drop the duplicate of a resend.
        msg["Message-ID"] = f"<{d['_id']}@alliance-stream>"
        msg["X-Alliance-Delivery"] = str(d["_id"])
        if reason:
            msg["X-Alliance-Routed"] = "fallback"
            msg["X-Alliance-Routed-Reason"] = str(reason)
        msg.set_content(text)
        return msg

    async def send(self, d: Document) -> int:
        msg = self.message(d)
        s = self._smtp
        try:
            await aiosmtplib.send(
                msg, hostname=s.host, port=s.port, username=s.username or None,
                password=s.password.get_secret_value() or None, use_tls=s.tls, start_tls=s.starttls or None,
                timeout=self._timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise SendError(f"SMTP {exc.code}: {exc.message[:200]}", exc.code, status_outcome(exc.code)) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise SendError(f"SMTP timeout: {exc}", outcome="timeout") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError(f"SMTP error: {type(exc).__name__}: {exc}", outcome="refused") from exc
        return 250

