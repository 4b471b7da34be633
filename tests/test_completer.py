"""CoTs of items that end together are stored in one statement (items.Completer), each as
`items.complete` stores one alone: the same row, the same answer, the same fate for an item
whose claim is lost or whose row another transaction holds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any
from uuid import UUID

import httpx
from sqlalchemy import select, text
from sqlalchemy.types import JSON

from app.deliberation.results import Completed, Gate, Grade, Thought
from app.store import items
from app.store.db import Sessions
from app.store.endings import COMPLETED
from app.store.models import Cot, ItemStatus
from tests.test_endings import stored
from tests.test_turn_writer import claimed_items, item_locked, lose

AGREED = Completed(
    intents={"explicit_intents": ["learn"], "implicit_intents": []},
    thoughts=[Thought(1, "seed thought", "seed", 0, 0), Thought(2, "a second look", "deliberation", 1, 1)],
    refined_thoughts=[{"text": "seed thought", "sources": [1]}],
    dropped=[{"id": 2, "reason": "redundant", "explanation": "says it again", "text": "a second look"}],
    unaccounted=[],
    response="Bees see ultraviolet.",
    rounds_used=2,
    agreed=True,
    agreed_by={"round": 1, "agent": 1},
    grade=Grade({"helpfulness": {"score": 4, "rationale": "clear"}}),
    gate=Gate(accepted=False, reasons=["policy_faithfulness < 4"]),
)
# None where JSON columns keep JSON null (agreed_by) and where they keep SQL NULL (scores, gate).
NO_ONE_AGREED = replace(AGREED, agreed=False, agreed_by=None, grade=None, gate=None)


JSON_COLUMNS = [c.name for c in Cot.__table__.columns if isinstance(c.type, JSON)]


async def cot_of(sessions: Sessions, item_id: UUID) -> dict[str, Any] | None:
    """The stored CoT as the database holds it, less what is the item's own; under "types",
    each JSON column's JSON type ('null' for JSON null, None for SQL NULL)."""
    types = ", ".join(f"jsonb_typeof({name})" for name in JSON_COLUMNS)
    async with sessions() as session:
        row = (
            await session.execute(
                text(
                    "SELECT to_jsonb(cots) - 'id' - 'item_id' - 'position' - 'created_at', "
                    f"ARRAY[{types}] FROM cots WHERE item_id = :item_id"
                ),
                {"item_id": item_id},
            )
        ).one_or_none()
    return None if row is None else {**row[0], "types": row[1]}


async def test_cots_of_items_ending_together_are_stored_in_one_statement_as_each_alone_would_be(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    alone, *together = await claimed_items(api, auth, sessions, 5)
    completer = items.Completer(sessions)
    results = [AGREED, NO_ONE_AGREED, AGREED, NO_ONE_AGREED]

    endings = await asyncio.gather(
        *(completer.complete(c, r) for c, r in zip(together, results, strict=True))
    )

    assert completer.statements == 1
    assert endings == [COMPLETED] * 4
    assert await items.complete(sessions, alone, NO_ONE_AGREED) == COMPLETED
    for claim, result in zip(together, results, strict=True):
        assert (await stored(sessions, claim.item_id)).status == ItemStatus.COMPLETED
        expected = await cot_of(sessions, alone.item_id) if result is NO_ONE_AGREED else None
        if expected is not None:
            assert await cot_of(sessions, claim.item_id) == expected
    agreed = await cot_of(sessions, together[0].item_id)
    assert agreed is not None
    assert (agreed["agreed_by"], agreed["scores"], agreed["gate_reasons"]) == (
        {"round": 1, "agent": 1},
        {"helpfulness": {"score": 4, "rationale": "clear"}},
        ["policy_faithfulness < 4"],
    )
    types = dict(zip(JSON_COLUMNS, (await cot_of(sessions, alone.item_id) or {})["types"], strict=True))
    assert (types["agreed_by"], types["scores"], types["gate_reasons"]) == ("null", None, None)
    # Stored: completing again writes nothing and says so, as alone.
    assert await completer.complete(together[0], AGREED) is None


async def test_an_item_whose_claim_was_lost_gets_nothing_written_and_holds_back_no_other(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    lost, kept = await claimed_items(api, auth, sessions, 2)
    await lose(sessions, lost)
    completer = items.Completer(sessions)

    endings = await asyncio.gather(completer.complete(lost, AGREED), completer.complete(kept, AGREED))

    assert endings == [None, COMPLETED]
    assert await cot_of(sessions, lost.item_id) is None
    assert (await stored(sessions, lost.item_id)).status == ItemStatus.RUNNING  # the new claim's


async def test_an_item_another_transaction_holds_is_completed_alone_once_free(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    locked, *others = await claimed_items(api, auth, sessions, 3)
    completer = items.Completer(sessions)
    async with sessions.begin() as blocker:  # a cancellation, a takeover: it holds the item row
        await item_locked(blocker, locked.item_id)
        waiting = asyncio.create_task(completer.complete(locked, AGREED))
        # Within a few seconds: a batch that waited for the lock would wait for the blocker.
        endings = await asyncio.wait_for(asyncio.gather(*(completer.complete(c, AGREED) for c in others)), 10)
        assert endings == [COMPLETED, COMPLETED]
        assert completer.statements == 1, "the locked item went with the others, and was skipped"
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the locked item waits for the lock, alone"
    assert await waiting == COMPLETED
    assert await cot_of(sessions, locked.item_id) is not None


async def test_a_cot_postgres_refuses_fails_only_its_own_item(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    refused, *others = await claimed_items(api, auth, sessions, 3)
    completer = items.Completer(sessions)
    unstorable = replace(AGREED, response="a NUL \x00 no text column holds")

    endings = await asyncio.gather(
        completer.complete(refused, unstorable),
        *(completer.complete(c, AGREED) for c in others),
        return_exceptions=True,
    )

    assert completer.statements == 1
    assert isinstance(endings[0], Exception)
    assert endings[1:] == [COMPLETED, COMPLETED]
    assert await cot_of(sessions, refused.item_id) is None
    assert (await stored(sessions, refused.item_id)).status == ItemStatus.RUNNING
    ids = [refused.item_id, *(claim.item_id for claim in others)]
    async with sessions() as session:
        assert len((await session.scalars(select(Cot.id).where(Cot.item_id.in_(ids)))).all()) == 2


async def test_of_a_stale_claim_and_the_current_one_of_an_item_only_the_current_cot_is_stored(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    [stale] = await claimed_items(api, auth, sessions, 1)
    await lose(sessions, stale)  # taken over: attempt 2 holds it now
    current = replace(stale, attempt=stale.attempt + 1)
    completer = items.Completer(sessions)
    stale_result = replace(AGREED, response="written under a lost claim")

    endings = await asyncio.gather(
        completer.complete(stale, stale_result), completer.complete(current, AGREED)
    )

    assert completer.statements == 1
    assert endings == [None, COMPLETED]
    assert (await cot_of(sessions, stale.item_id) or {})["response"] == AGREED.response


async def test_a_completion_that_writes_a_delivery_goes_alone(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    [claim] = await claimed_items(api, auth, sessions, 1)
    completer = items.Completer(sessions)

    assert await completer.complete(replace(claim, notifies=True), AGREED) == COMPLETED

    assert completer.statements == 0
    assert await cot_of(sessions, claim.item_id) is not None
