"""Cursors of listings ordered by a time and an id (a key's jobs, its webhooks, an item's
reviews): a cursor holds the previous page's last row's place, not the row, so a page resumes
right after a row deleted since, and resuming needs no lookup.

A place is the row's time in microseconds since the epoch (as Postgres keeps it: the round
trip is exact) and its id, 24 bytes. It is not signed and need not be: each listing's query
keeps the caller's own rows, so a made-up place only moves within them."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from uuid import UUID

from app.errors import InvalidCursor
from app.store.jobs import decode_cursor_bytes, encode_cursor_bytes

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_POSITION = struct.Struct(">q16s")
POSITION_BYTES = _POSITION.size


def encode_position(at: datetime, row_id: UUID) -> str:
    return encode_cursor_bytes(_POSITION.pack((at - _EPOCH) // _MICROSECOND, row_id.bytes))


def decode_position(cursor: str) -> tuple[datetime, UUID]:
    """The (time, id) a cursor holds; InvalidCursor if it holds none."""
    return position_of(decode_cursor_bytes(cursor))


def position_of(data: bytes) -> tuple[datetime, UUID]:
    """The (time, id) a decoded cursor's bytes hold; InvalidCursor if they hold none."""
    if len(data) != POSITION_BYTES:
        raise InvalidCursor("the cursor is not one this API returned")
    microseconds, row_id = _POSITION.unpack(data)
    try:
        return _EPOCH + microseconds * _MICROSECOND, UUID(bytes=row_id)
    except OverflowError as exc:  # before year 1 or after 9999: not an instant a row was made
        raise InvalidCursor("the cursor is not one this API returned") from exc
