"""List filters and cursor paging, exactly as the SDK encodes them (protocol doc §1.5).

Cursors are opaque to clients: the (start time, id) of the last item served, base64-encoded.
Paging by position rather than offset keeps pages stable while sandboxes come and go.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from cube.api.errors import ApiError
from cube.pool.sandboxes import Sandbox

T = TypeVar("T")
STATES = ("running", "paused")
MAX_LIMIT = 100


def parse_metadata(value: str | None) -> dict[str, str]:
    """The ``metadata`` query value (already un-escaped once by the HTTP layer) is itself a
    query string whose keys and values are percent-encoded once more."""
    if not value:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(value, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ApiError(400, f"invalid metadata filter: {exc}") from exc
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def parse_states(value: str | None) -> set[str]:
    if not value:
        return set(STATES)
    states = {s.strip() for s in value.split(",") if s.strip()}
    unknown = states - set(STATES)
    if unknown:
        raise ApiError(400, f"invalid state filter: {', '.join(sorted(unknown))}")
    return states


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ApiError(400, f"invalid startedAfter: {value!r}") from exc
    if moment.tzinfo is None:
        raise ApiError(400, "startedAfter needs a UTC offset")
    return moment


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return MAX_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}")
    return int(value)


def parse_order(value: str | None) -> bool:
    """True for descending (the default)."""
    if value in (None, "", "desc"):
        return True
    if value == "asc":
        return False
    raise ApiError(400, "order must be asc or desc")


def matches(
    sandbox: Sandbox,
    metadata: dict[str, str],
    states: set[str],
    started_after: datetime | None,
    template: str | None,
) -> bool:
    """Whether a sandbox passes the filters. ``startedAfter`` is inclusive and compared as the
    client saw the start time (to the microsecond), so a sandbox's own startedAt matches it."""
    record = sandbox.record
    return (
        record.state in states
        and all(record.metadata.get(k) == v for k, v in metadata.items())
        and (
            started_after is None or datetime.fromtimestamp(record.started_at, UTC) >= started_after
        )
        and (template is None or template in (record.template_id, record.alias))
    )


def _encode_cursor(position: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(f"{position[0]!r}/{position[1]}".encode()).decode()


def _decode_cursor(token: str) -> tuple[float, str]:
    try:
        started, _, key = base64.urlsafe_b64decode(token.encode()).decode().partition("/")
        return float(started), key
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid nextToken") from exc


def page(
    items: Sequence[T],
    position: Callable[[T], tuple[float, str]],
    descending: bool,
    limit: int,
    token: str | None,
) -> tuple[list[T], str | None]:
    """One page of ``items`` ordered by ``position``, starting after the cursor ``token``;
    returns the page and the next cursor (None on the last page)."""
    ordered = sorted(items, key=position, reverse=descending)
    if token:
        after = _decode_cursor(token)
        ordered = [
            item
            for item in ordered
            if (position(item) < after if descending else position(item) > after)
        ]
    chunk = ordered[:limit]
    more = len(ordered) > limit
    return chunk, _encode_cursor(position(chunk[-1])) if more else None
