"""Cursors of listings ordered by a time and an id (a key's jobs, its comparisons, its
webhooks, an item's reviews): a cursor holds the previous page's last row's place, not the
row, so a page resumes right after a row deleted since, and resuming needs no lookup.

A place is the row's time in microseconds since the epoch (as Postgres keeps it: the round
trip is exact) and its id, 24 bytes, after a byte naming the listing. It is not signed and
need not be: each listing's query keeps the caller's own rows, so a made-up place only moves
within them. The listing's byte is what tells another listing's cursor from this one's: given
to another listing, a place is no row of it, and its page began wherever that place fell."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from uuid import UUID

from app.errors import InvalidCursor
from app.store.jobs import decode_cursor_bytes, encode_cursor_bytes

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_PLACE = struct.Struct(">q16s")
_NAMED_PLACE = struct.Struct(">Bq16s")


class Listing(IntEnum):
    """The listings whose cursors hold a place, each by the byte its cursors begin with. A
    named place cut to 24 bytes (its text two characters short) reads as an unnamed one whose
    time begins with that byte: from 0x11 on, that time is past year 9999, so it is refused
    rather than taken as a place in the 45th century (from 0x01, it was)."""

    JOBS = 0x11
    COMPARISONS = 0x12
    WEBHOOKS = 0x13
    ITEM_REVIEWS = 0x14

    @property
    def route(self) -> str:
        return _ROUTES[self]


_ROUTES = {
    Listing.JOBS: "GET /v1/jobs",
    Listing.COMPARISONS: "GET /v1/comparisons",
    Listing.WEBHOOKS: "GET /v1/webhooks",
    Listing.ITEM_REVIEWS: "GET /v1/items/{id}/reviews",
}
_NOT_RETURNED = "the cursor is not one this API returned"


def encode_position(listing: Listing, at: datetime, row_id: UUID) -> str:
    return encode_cursor_bytes(_NAMED_PLACE.pack(listing, (at - _EPOCH) // _MICROSECOND, row_id.bytes))


def decode_position(listing: Listing, cursor: str) -> tuple[datetime, UUID]:
    """The (time, id) a cursor of `listing` holds; InvalidCursor if it holds none, or is
    another listing's."""
    return position_of(listing, decode_cursor_bytes(cursor))


def position_of(listing: Listing, data: bytes) -> tuple[datetime, UUID]:
    """The (time, id) a decoded cursor's bytes hold, as `decode_position`."""
    if len(data) == _NAMED_PLACE.size:
        named, microseconds, row_id = _NAMED_PLACE.unpack(data)
        if named != listing:
            raise InvalidCursor(_another_listings(named))
    elif len(data) == _PLACE.size:
        # Issued before cursors named their listing: taken by any of these, as it was then,
        # so that a client paging across the upgrade goes on.
        microseconds, row_id = _PLACE.unpack(data)
    else:
        raise InvalidCursor(_NOT_RETURNED)
    try:
        return _EPOCH + microseconds * _MICROSECOND, UUID(bytes=row_id)
    except OverflowError as exc:  # before year 1 or after 9999: not an instant a row was made
        raise InvalidCursor(_NOT_RETURNED) from exc


def _another_listings(named: int) -> str:
    if named not in Listing:
        return _NOT_RETURNED
    return (
        f"the cursor is one that {Listing(named).route} returned, not this listing: pass each "
        "listing only its own next_cursor"
    )
