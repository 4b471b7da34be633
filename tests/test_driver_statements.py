"""The fast path's statements are built from the tables and bound by name: every column the
database does not fill is a parameter, constants are written into the SQL, and JSON is
stored as it always was (SQL NULL or JSON null, as the column declares)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
from sqlalchemy import Table, bindparam, text, update

from app.deliberation.results import Completed, Thought
from app.store import items
from app.store.db import Sessions
from app.store.driver_statements import DriverStatement, insert_from
from app.store.endings import COMPLETED, ending_values
from app.store.models import Cot, Item, PreferencePair, TurnRow
from app.store.turn_log import PostgresTurnLog
from app.store.turn_writer import TurnWriter
from tests.test_turn_log import a_turn, claimed_item


@pytest.mark.parametrize(
    ("table", "filled_by_database"),
    [
        # cached_prompt_tokens has a server default for turns older than it (the turn log binds it).
        (TurnRow.__table__, {"id", "created_at", "cached_prompt_tokens"}),
        (Cot.__table__, {"created_at"}),
        (PreferencePair.__table__, {"created_at"}),
    ],
)
def test_an_inserted_row_binds_every_column_the_database_does_not_fill(
    table: Table, filled_by_database: set[str]
) -> None:
    statement = DriverStatement(insert_from(table, Item.__table__, item_id=Item.__table__.c.id))

    bound = {name.removeprefix(f"{table.name}.") for name in statement.parameters}
    assert bound == {column.name for column in table.columns} - filled_by_database - {"item_id"}


def test_a_row_without_one_of_its_columns_is_refused_before_anything_is_sent() -> None:
    statement = DriverStatement(insert_from(TurnRow.__table__, Item.__table__, item_id=Item.__table__.c.id))
    row = {name.removeprefix("turns."): 0 for name in statement.parameters}
    del row["latency_ms"]

    with pytest.raises(KeyError, match="latency_ms"):
        statement.args({"turns": row})


def test_constants_are_written_into_the_sql_and_only_what_a_call_supplies_is_a_parameter() -> None:
    statement = DriverStatement(
        update(Item)
        .where(items.claim_holds(bindparam("item_id"), bindparam("attempt")))
        .values(ending_values(COMPLETED))
    )

    assert statement.parameters == ("item_id", "attempt")
    assert "status='completed'" in statement.sql and "items.status = 'running'" in statement.sql
    assert "error_code=NULL" in statement.sql


async def test_absent_json_is_stored_as_it_always_was(
    api: httpx.AsyncClient, auth: dict[str, str], sessions: Sessions
) -> None:
    claim = await claimed_item(api, auth, sessions)
    await PostgresTurnLog(TurnWriter(sessions), claim).record(
        replace(a_turn(claim.item_id, "raw"), parsed=None)
    )
    no_one_agreed = Completed(
        intents={"explicit_intents": ["x"], "implicit_intents": []},
        thoughts=[Thought(1, "t", "seed", 0, 0)],
        refined_thoughts=[{"text": "t", "sources": [1]}],
        dropped=[],
        unaccounted=[],
        response="r",
        rounds_used=4,
        agreed=False,
        agreed_by=None,
    )
    assert await items.complete(sessions, claim, no_one_agreed)

    async with sessions() as session:
        turn_parsed = await session.scalar(text("SELECT parsed IS NULL FROM turns"))
        cot = (
            await session.execute(
                text(
                    "SELECT jsonb_typeof(agreed_by) AS agreed_by, scores IS NULL AS no_scores, "
                    "gate_reasons IS NULL AS no_gate_reasons FROM cots"
                )
            )
        ).one()
    assert turn_parsed is True  # SQL NULL: no parsed output
    assert (cot.agreed_by, cot.no_scores, cot.no_gate_reasons) == ("null", True, True)
