"""The WhatsApp template catalog the sandbox providers answer from (`templates.json`), with the
statuses a test has set, and the cursor paging of catalog listings."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request

_PLACEHOLDER = re.compile(r"\{\{\s*(\d+)\s*\}\}")
_NOT_APPROVED = {"PENDING", "REJECTED", "IN_APPEAL", "PENDING_DELETION", "DELETED"}


@cache
def load_catalog() -> tuple[dict[str, Any], ...]:
    """The local WhatsApp template catalog (`templates.json`), in Meta's template shape."""
    text = resources.files(__package__).joinpath("templates.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def body_parameter_count(template: dict[str, Any]) -> int:
    """Highest `{{n}}` in the template's BODY component (Meta numbers them 1..n)."""
    for component in template.get("components", []):
        if str(component.get("type", "")).upper() == "BODY":
            numbers = [int(n) for n in _PLACEHOLDER.findall(component.get("text", ""))]
            return max(numbers, default=0)
    return 0


def find_template(
    name: str, language: str, statuses: Mapping[tuple[str, str], str] | None = None
) -> dict[str, Any] | None:
    """The catalog's template, with the status a test set (`POST /_sandbox/templates`)."""
    for template in load_catalog():
        if template["name"] == name and template["language"] == language:
            return with_status(template, statuses)
    return None


def with_status(
    template: dict[str, Any], statuses: Mapping[tuple[str, str], str] | None
) -> dict[str, Any]:
    status = (statuses or {}).get((template["name"], template["language"]))
    return template if status is None else {**template, "status": status}


def template_statuses_of(request: Request) -> dict[tuple[str, str], str]:
    """Template statuses changed while running (name, language) -> status; per app."""
    statuses: dict[tuple[str, str], str] = request.app.state.template_statuses
    return statuses


def page_cursor(index: int) -> str:
    """Opaque cursor like Meta's (base64 of the position); clients must not parse it."""
    return base64.urlsafe_b64encode(str(index).encode()).decode().rstrip("=")


def page_index(cursor: str) -> int | None:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
