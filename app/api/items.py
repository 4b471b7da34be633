"""/v1/items/{id}: one item with its CoT and every agent turn (the deliberation log)."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Response

from app.api import views
from app.api.deps import CurrentKey, ReadsHazardous, SessionDep
from app.api.jobs import ERRORS
from app.api.json_answers import json_answer
from app.api.schemas import ItemDetailOut
from app.store import jobs

router = APIRouter(prefix="/v1/items", tags=["items"])


@router.get("/{item_id}", responses=ERRORS, response_model=ItemDetailOut)
async def get_item(
    item_id: UUID, session: SessionDep, key: CurrentKey, reads_hazardous: ReadsHazardous
) -> Response:
    """Turns that may hold hazardous text (see TurnOut) are blanked for keys without the
    `hazardous:read` scope."""
    item, job = await jobs.get_item_owned(session, item_id, key.id)
    cot = await jobs.item_cot(session, item_id)
    turns = await jobs.item_turns(session, item_id)

    def detail() -> ItemDetailOut:
        return ItemDetailOut(
            **views.item_out(item).model_dump(),
            cot=views.cot_out(cot, item) if cot else None,
            turns=[views.turn_out(t, reads_hazardous) for t in turns],
            usage=views.item_usage(turns),
        )

    # Every turn, each up to a reply's length: tens of MB for a long item, shaped and encoded
    # on the event loop, held it for 58 ms at 300 turns of 64 KB.
    return await json_answer(session, detail)
