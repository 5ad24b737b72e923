"""`GET /v1/audit`: a tenant's access audit trail (who read or changed which client's data, when).

A tenant-wide admin key reads its own tenant's entries only, oldest first, in pages; reading the
trail is itself recorded (`audit.read`). Entries are written by every service through
`shared.audit`; they appear here within the writers' flush interval (about 200 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pymongo.asynchronous.collection import AsyncCollection

from services.reporting.api import AUTH, BEARER
from services.reporting.settings import ReportingSettings
from shared import audit
from shared.audit import Auditor
from shared.auth import KeyStore, Principal, require
from shared.http import error_body
from shared.mongo import Document


class AuditEntryOut(BaseModel):
    """One audited request or operator command."""

    id: str = Field(description="unique; entries are ordered by `at`, then `id`")
    at: datetime
    tenant_id: str
    key_id: str = Field(description="the API key's public id, or `cli` for an operator command")
    role: str = Field(description="the key's role (submit, read, admin), or `operator`")
    site: str | None = Field(description="the site the key is bound to; null for a tenant-wide key")
    service: str = Field(description="intake, alerts, reporting, or cli")
    action: str = Field(description="e.g. trajectory.read, alert.acknowledge, clinician.put, keys.create")
    client_id: str | None = Field(default=None, description="the client whose data was read or changed")
    target: str | None = Field(default=None, description="the clinician, alert, subscription, submission or key")
    outcome: Literal["allowed", "denied", "not_found", "invalid", "error"] = Field(
        description="denied: the key may not see it (another site's client, a role that does not allow it)")
    operator: str | None = Field(default=None, description="the operating-system user of a CLI command")


class AuditPageOut(BaseModel):
    entries: list[AuditEntryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


ClientQ = Annotated[str | None, Query(min_length=1, max_length=128, description="only entries about this client")]
SinceQ = Annotated[datetime | None, Query(description="only entries at or after this time (ISO 8601)")]
CursorQ = Annotated[str | None, Query(max_length=2048, description="next_cursor of the previous page")]
LimitQ = Annotated[int | None, Query(ge=1, le=1000, description="page size (capped by the server)")]


def build_audit_router(collection: AsyncCollection[Document], keys: Callable[[], KeyStore], auditor: Auditor,
                       settings: ReportingSettings) -> APIRouter:
    """The `/v1/audit` route."""
    router = APIRouter(prefix="/v1", tags=["audit"], dependencies=[Security(BEARER)])
    admin = require(keys, "admin")

    @router.get("/audit", summary="The tenant's access audit trail, oldest first (tenant-wide admin key)",
                responses={200: {"model": AuditPageOut},
                           403: {"description": "not an admin key, or a key bound to a site"},
                           422: {"description": "a cursor this API did not issue"}, 401: AUTH[401]})
    async def audit_trail(p: Principal = auditor.route("audit.read", admin, client_param=None),
                          client_id: ClientQ = None, since: SinceQ = None, cursor: CursorQ = None,
                          limit: LimitQ = None) -> JSONResponse:
        if p.site_id is not None:
            raise HTTPException(403, error_body([("Authorization", "the audit trail needs a tenant-wide admin key; "
                                                                   f"this key is bound to site '{p.site_id}'")]))
        try:
            after = audit.decode_cursor(cursor) if cursor else None
        except audit.BadCursor as exc:
            raise HTTPException(422, error_body([("cursor", str(exc))])) from exc
        size = min(limit or settings.page_size, settings.max_page_size)
        docs, more = await audit.read_page(collection, audit.query(p.tenant_id, client_id, since, after), size)
        body: dict[str, Any] = {"entries": [audit.view(d) for d in docs],
                                "next_cursor": audit.encode_cursor(docs[-1]) if more else None}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
