"""Request bodies for tests: a valid one, with the fields a test is about changed."""

from __future__ import annotations

from typing import Any


def changed(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A copy of `body` with `fields` set; a field given as `...` is left out."""
    out = dict(body)
    for name, value in fields.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out
