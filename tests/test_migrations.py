"""Migrations carry existing rows forward: each test builds its own database at an older
revision, writes rows as that revision's code did, and upgrades to head. Before any of them,
the environment (migrations/env.py) asks the server's version."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest
from alembic import command
from alembic.config import Config

from app.deliberation.config import Mode
from app.plan import ComparisonPlan, GenerationPlan, read_plan
from tests.conftest import statements_sent


async def test_the_migrations_ask_the_servers_version_before_any_ddl(
    old_database: tuple[Config, str],
) -> None:
    """A server older than 15 stops with preflight.postgres_too_old's message (which
    test_preflight checks on such versions, which this server cannot report), not at the first
    NULLS NOT DISTINCT with a bare syntax error. The migrations' own transaction stays theirs:
    the autocommit blocks of 0026 and 0031 commit it."""
    config, _ = old_database

    with statements_sent() as sent:
        await asyncio.to_thread(command.upgrade, config, "head")

    asked = sent.index("SHOW server_version_num")
    first_ddl = next(n for n, sql in enumerate(sent) if sql.lstrip().upper().startswith("CREATE"))
    assert asked < first_ddl


async def test_annotations_get_their_jobs_owner_and_a_per_item_identity(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0003_annotations")
    connection = await asyncpg.connect(dsn)
    try:
        owners = [uuid.uuid4(), uuid.uuid4()]
        items = []
        for owner in owners:
            job, item, policy_set = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            await connection.execute(
                "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', $2)",
                owner,
                owner.hex,
            )
            await connection.execute(
                "INSERT INTO policy_sets (id, name, version, description, policies) "
                "VALUES ($1, 'p', $2, '', '[]')",
                policy_set,
                owner.hex[:32],
            )
            await connection.execute(
                "INSERT INTO jobs (id, owner_key_id, policy_set_id, config, request_hash, item_count) "
                "VALUES ($1, $2, $3, '{}', 'h', 1)",
                job,
                owner,
                policy_set,
            )
            await connection.execute(
                "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
                "failures, enqueues) VALUES ($1, $2, 0, 'p', '{}', 'completed', 'done', 1, 0, 1)",
                item,
                job,
            )
            items.append((item, job))
        for (item, job), annotation_id in zip(items, ("1", "2"), strict=True):
            await connection.execute(
                "INSERT INTO annotations (id, item_id, job_id, source, external_id, annotator, "
                "annotated_at, verdict, flagged_thoughts, raw) "
                "VALUES ($1, $2, $3, 'label_studio', $4, 'a', now(), 'accept', '[]', '{}')",
                uuid.uuid4(),
                item,
                job,
                annotation_id,
            )

        await asyncio.to_thread(command.upgrade, config, "head")

        rows = await connection.fetch(
            "SELECT item_id, owner_key_id, retracted FROM annotations ORDER BY external_id"
        )
        assert [(r["item_id"], r["owner_key_id"], r["retracted"]) for r in rows] == [
            (items[0][0], owners[0], False),
            (items[1][0], owners[1], False),
        ]
        # The same tool id and time is now a different annotation for another owner's item.
        copied = await connection.execute(
            "INSERT INTO annotations (id, owner_key_id, item_id, job_id, source, external_id, annotator, "
            "annotated_at, flagged_thoughts, raw) SELECT gen_random_uuid(), $1, $2, $3, source, external_id, "
            "annotator, annotated_at, flagged_thoughts, raw FROM annotations WHERE item_id = $4",
            owners[1],
            items[1][0],
            items[1][1],
            items[0][0],
        )
        assert copied == "INSERT 0 1"
    finally:
        await connection.close()


async def _constraint_names(dsn: str) -> set[tuple[str, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT conrelid::regclass::text AS table_name, conname FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace "
            "UNION SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()
    return {(row["table_name"], row["conname"]) for row in rows}


async def test_the_naming_convention_migration_renames_constraints_and_back(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0006_operator_errors")
    named_by_postgres = await _constraint_names(dsn)

    await asyncio.to_thread(command.upgrade, config, "0007_naming_convention")
    renamed = await _constraint_names(dsn)
    assert {
        ("items", "pk_items"),
        ("items", "fk_items_job_id_jobs"),
        ("items", "uq_items_job_id_position"),
    } < renamed
    assert not {name for _, name in renamed} & {
        "items_pkey",
        "items_job_id_fkey",
        "items_job_id_position_key",
    }

    await asyncio.to_thread(command.downgrade, config, "0006_operator_errors")
    assert await _constraint_names(dsn) == named_by_postgres


# A job's config as the first release stored it: no mode, grading or pairs.
LEGACY_CONFIG = {
    "max_rounds": 2,
    "max_tokens": 256,
    "max_reasks": 1,
    "roles": {
        role: {"endpoint": "default", "model": "m", "temperature": 0.7}
        for role in ("intent", "seed", "refiner")
    }
    | {"deliberators": [{"endpoint": "default", "model": "m", "temperature": 0.7}]},
}


async def test_job_plans_migration_moves_comparison_links_out_of_item_metadata_and_back(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0007_naming_convention")
    connection = await asyncpg.connect(dsn)
    try:
        owner, policy_set = uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', 'h')", owner
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, owner_key_id, name, version, description, policies) "
            "VALUES ($1, $2, 'p', 'v', '', '[]')",
            policy_set,
            owner,
        )
        baseline, candidate, comparison = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        comparison_config = {
            "mode": "comparison",
            "baseline_job_id": str(baseline),
            "candidate_job_id": str(candidate),
            "judge": {"endpoint": "default", "model": "m", "temperature": 0.0},
            "max_tokens": 256,
            "max_reasks": 1,
        }
        for job, job_config in (
            (baseline, LEGACY_CONFIG),
            (candidate, {**LEGACY_CONFIG, "mode": "zero_shot", "grading": None, "pairs": None}),
            (comparison, comparison_config),
        ):
            await connection.execute(
                "INSERT INTO jobs (id, owner_key_id, policy_set_id, config, request_hash, item_count) "
                "VALUES ($1, $2, $3, $4, 'h', 1)",
                job,
                owner,
                policy_set,
                json.dumps(job_config),
            )
        # The user's own metadata may use the same names: only a comparison item's are links.
        user_metadata = {"a_item_id": "mine", "source": "csv"}
        base_item, cand_item, compared = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for item, job, metadata in (
            (base_item, baseline, user_metadata),
            (cand_item, candidate, {}),
            (compared, comparison, {"a_item_id": str(base_item), "b_item_id": str(cand_item)}),
        ):
            await connection.execute(
                "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
                "failures, enqueues) VALUES ($1, $2, 0, 'p', $3, 'queued', 'intent', 0, 0, 1)",
                item,
                job,
                json.dumps(metadata),
            )

        await asyncio.to_thread(command.upgrade, config, "0008_job_plans")

        items = {
            row["id"]: (json.loads(row["metadata"]), row["baseline_item_id"], row["candidate_item_id"])
            for row in await connection.fetch(
                "SELECT id, metadata, baseline_item_id, candidate_item_id FROM items"
            )
        }
        assert items == {
            base_item: (user_metadata, None, None),
            cand_item: ({}, None, None),
            compared: ({}, base_item, cand_item),
        }
        plans = {
            row["id"]: read_plan(json.loads(row["plan"]))
            for row in await connection.fetch("SELECT id, plan FROM jobs")
        }
        legacy = plans[baseline]
        assert isinstance(legacy, GenerationPlan)  # read as the worker always read it
        assert (legacy.mode, legacy.grading, legacy.pairs, legacy.max_rounds) == (Mode.AIDSAFE, None, None, 2)
        assert isinstance(plans[candidate], GenerationPlan) and plans[candidate].mode is Mode.ZERO_SHOT
        assert plans[comparison] == ComparisonPlan.model_validate(comparison_config)

        await asyncio.to_thread(command.downgrade, config, "0007_naming_convention")

        metadata_by_item = {
            row["id"]: json.loads(row["metadata"])
            for row in await connection.fetch("SELECT id, metadata FROM items")
        }
        assert metadata_by_item == {
            base_item: user_metadata,
            cand_item: {},
            compared: {"a_item_id": str(base_item), "b_item_id": str(cand_item)},
        }
        assert json.loads(await connection.fetchval("SELECT config FROM jobs WHERE id = $1", comparison)) == (
            comparison_config
        )
    finally:
        await connection.close()


async def test_the_costs_migration_leaves_old_turns_unpriced_and_requeues_waiting_items_on_the_way_down(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0014_cot_fallbacks")
    connection = await asyncpg.connect(dsn)
    try:
        owner, policy_set, job, item = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', 'h')", owner
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, owner_key_id, name, version, description, policies) "
            "VALUES ($1, $2, 'p', 'v', '', '[]')",
            policy_set,
            owner,
        )
        await connection.execute(
            "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
            "VALUES ($1, $2, $3, '{}', 'h', 1)",
            job,
            owner,
            policy_set,
        )
        await connection.execute(
            "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
            "failures, enqueues) VALUES ($1, $2, 0, 'p', '{}', 'running', 'seed', 1, 0, 1)",
            item,
            job,
        )
        for stage, prompt_tokens, completion_tokens in (("intent", 100, 20), ("seed", 300, 50)):
            await connection.execute(
                "INSERT INTO turns (item_id, job_id, stage, round, agent, attempt, role, endpoint, model, "
                "request_hash, raw_output, outcome, prompt_tokens, completion_tokens, latency_ms) "
                "VALUES ($1, $2, $3, 0, 0, 0, $3, 'default', 'm', 'h', '{}', 'ok', $4, $5, 1.0)",
                item,
                job,
                stage,
                prompt_tokens,
                completion_tokens,
            )

        await asyncio.to_thread(command.upgrade, config, "0015_costs")

        budget = await connection.fetchrow("SELECT budget_max_cost_usd, budget_max_tokens FROM jobs")
        assert tuple(budget) == (None, None)
        turns = await connection.fetch("SELECT cached_prompt_tokens, cost_usd FROM turns")
        assert [tuple(t) for t in turns] == [(0, None), (0, None)]  # unpriced then: unknown cost
        await connection.execute(
            "UPDATE items SET status = 'budget_exhausted', error_code = 'budget_exhausted'"
        )

        await asyncio.to_thread(command.downgrade, config, "0014_cot_fallbacks")

        # The older code knows no such status: the item goes back to the queue.
        assert tuple(await connection.fetchrow("SELECT status, error_code FROM items")) == ("queued", None)
        columns = {
            r["column_name"]
            for r in await connection.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name IN ('jobs', 'turns')"
            )
        }
        assert not columns & {
            "budget_max_cost_usd",
            "budget_max_tokens",
            "cost_usd",
            "cached_prompt_tokens",
        }
    finally:
        await connection.close()


async def test_the_prompt_sets_migration_leaves_old_jobs_on_the_builtin_set_and_old_cots_unnamed(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0015_costs")
    connection = await asyncpg.connect(dsn)
    try:
        owner, policy_set, job, item = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', 'h')", owner
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, owner_key_id, name, version, description, policies) "
            "VALUES ($1, $2, 'p', 'v', '', '[]')",
            policy_set,
            owner,
        )
        await connection.execute(
            "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
            "VALUES ($1, $2, $3, '{}', 'h', 1)",
            job,
            owner,
            policy_set,
        )
        await connection.execute(
            "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
            "failures, enqueues) VALUES ($1, $2, 0, 'p', '{}', 'completed', 'done', 1, 0, 1)",
            item,
            job,
        )
        await connection.execute(
            "INSERT INTO cots (id, item_id, job_id, position, policy_set_id, policy_set_name, "
            "policy_set_version, intents, thoughts, refined_thoughts, dropped_thoughts, "
            "unaccounted_thought_ids, response, rounds_used, agreed, fallbacks) "
            "VALUES ($1, $2, $3, 0, $4, 'p', 'v', '{}', '[]', '[]', '[]', '[]', 'r', 1, true, '[]')",
            uuid.uuid4(),
            item,
            job,
            policy_set,
        )

        await asyncio.to_thread(command.upgrade, config, "0017_prompt_sets")

        assert await connection.fetchval("SELECT prompt_set_id FROM jobs") is None  # the built-in set
        cot = await connection.fetchrow("SELECT prompt_set_id, prompt_set_name, prompt_set_version FROM cots")
        assert tuple(cot) == (None, None, None)  # which templates wrote it was not recorded
        assert await connection.fetchval("SELECT count(*) FROM prompt_sets") == 0

        await asyncio.to_thread(command.downgrade, config, "0016_sample_evaluations")

        assert await connection.fetchval("SELECT to_regclass('prompt_sets')") is None
        columns = {
            r["column_name"]
            for r in await connection.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name IN ('jobs', 'cots')"
            )
        }
        assert not columns & {"prompt_set_id", "prompt_set_name", "prompt_set_version"}
    finally:
        await connection.close()


async def test_judgements_become_the_first_judges_and_several_judges_go_on_the_way_down(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0019_deletion_mode_width")
    connection = await asyncpg.connect(dsn)
    try:
        owner, policy_set, comparison, item = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', 'h')", owner
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, owner_key_id, name, version, description, policies) "
            "VALUES ($1, $2, 'p', 'v', '', '[]')",
            policy_set,
            owner,
        )
        judge = {"endpoint": "default", "model": "m", "temperature": 0.0, "instructions": ""}
        one_judge = {
            "mode": "comparison",
            "baseline_job_id": str(uuid.uuid4()),
            "candidate_job_id": str(uuid.uuid4()),
            "judge": judge,
            "max_tokens": 256,
            "max_reasks": 1,
        }
        await connection.execute(
            "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
            "VALUES ($1, $2, $3, $4, 'h', 1)",
            comparison,
            owner,
            policy_set,
            json.dumps(one_judge),
        )
        await connection.execute(
            "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
            "failures, enqueues) VALUES ($1, $2, 0, 'p', '{}', 'completed', 'judge', 1, 0, 1)",
            item,
            comparison,
        )
        insert_judgement = (
            "INSERT INTO judgements (id, item_id, job_id, position, a_item_id, b_item_id, winner, votes{}) "
            "VALUES ($1, $2, $3, 0, $2, $2, $4, '[]'{})"
        )
        await connection.execute(insert_judgement.format("", ""), uuid.uuid4(), item, comparison, "b")

        await asyncio.to_thread(command.upgrade, config, "0020_comparison_judges")

        assert [tuple(r) for r in await connection.fetch("SELECT judge, winner FROM judgements")] == [
            (0, "b")
        ]
        plan = read_plan(json.loads(await connection.fetchval("SELECT plan FROM jobs")))
        assert isinstance(plan, ComparisonPlan) and len(plan.judges) == 1
        # A second judge's verdict on the item now has a row of its own; a second of the same judge has none.
        await connection.execute(
            insert_judgement.format(", judge", ", 1"), uuid.uuid4(), item, comparison, "a"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(
                insert_judgement.format(", judge", ", 1"), uuid.uuid4(), item, comparison, "tie"
            )
        two_judges = {**one_judge, "judges": [judge, {**judge, "model": "second"}], "mismatches": ["grader"]}
        del two_judges["judge"]
        await connection.execute("UPDATE jobs SET plan = $1", json.dumps(two_judges))

        await asyncio.to_thread(command.downgrade, config, "0019_deletion_mode_width")

        assert [r["winner"] for r in await connection.fetch("SELECT winner FROM judgements")] == ["b"]
        assert json.loads(await connection.fetchval("SELECT plan FROM jobs")) == one_judge
    finally:
        await connection.close()


async def test_pairs_below_their_jobs_min_gap_become_made_pairs_and_not_kept_again_on_the_way_down(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0020_comparison_judges")
    connection = await asyncpg.connect(dsn)
    try:
        owner, policy_set, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', 'h')", owner
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, owner_key_id, name, version, description, policies) "
            "VALUES ($1, $2, 'p', 'v', '', '[]')",
            policy_set,
            owner,
        )
        await connection.execute(
            "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
            "VALUES ($1, $2, $3, $4, 'h', 3)",
            job,
            owner,
            policy_set,
            json.dumps({"mode": "aidsafe", "pairs": {"max_tries": 3, "min_gap": 1.0}}),
        )
        stored = [
            (True, None, 3.0),
            (False, "gap_below_threshold", 0.5),
            (False, "guard_never_flagged", None),
        ]
        for position, (kept, reason, gap) in enumerate(stored):
            item = uuid.uuid4()
            await connection.execute(
                "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
                "failures, enqueues) VALUES ($1, $2, $3, 'p', '{}', 'completed', 'done', 1, 0, 1)",
                item,
                job,
                position,
            )
            await connection.execute(
                "INSERT INTO preference_pairs (id, item_id, job_id, position, kept, reason, gap, tries) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, '[]')",
                uuid.uuid4(),
                item,
                job,
                position,
                kept,
                reason,
                gap,
            )

        def pairs(flag: str) -> str:
            return f"SELECT {flag}, reason, gap FROM preference_pairs ORDER BY position"

        await asyncio.to_thread(command.upgrade, config, "0021_pair_candidates")

        made = [tuple(row) for row in await connection.fetch(pairs("paired"))]
        assert made == [(True, None, 3.0), (True, None, 0.5), (False, "guard_never_flagged", None)]
        assert await connection.fetchval("SELECT count(*) FROM pair_candidates") == 0

        await asyncio.to_thread(command.downgrade, config, "0020_comparison_judges")

        assert [tuple(row) for row in await connection.fetch(pairs("kept"))] == stored
        assert await connection.fetchval("SELECT to_regclass('pair_candidates')") is None
    finally:
        await connection.close()


async def test_every_compressible_column_is_lz4_after_upgrade_and_the_default_again_after_downgrade(
    old_database: tuple[Config, str],
) -> None:
    """A table or column added later must say `COMPRESSION lz4` too (see migration 0024)."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "head")
    connection = await asyncpg.connect(dsn)
    columns = """
        SELECT c.relname || '.' || a.attname AS name, a.attcompression::text AS method
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
          AND c.relname <> 'alembic_version' AND a.attnum > 0 AND NOT a.attisdropped
          AND t.typstorage IN ('x', 'm')
        ORDER BY 1
    """
    try:
        upgraded = {row["name"]: row["method"] for row in await connection.fetch(columns)}
        assert {"turns.raw_output", "turns.parsed", "cots.response", "items.prompt"} <= upgraded.keys()
        assert {name for name, method in upgraded.items() if method != "l"} == set()

        # A value over the size Postgres compresses at is stored with lz4.
        await connection.execute(
            "INSERT INTO policy_sets (id, name, version, description, policies) "
            "VALUES ($1, 'p', 'v', $2, '[]')",
            uuid.uuid4(),
            "a description long enough to be compressed " * 200,
        )
        stored_as = await connection.fetchval("SELECT pg_column_compression(description) FROM policy_sets")
        assert stored_as == "lz4"

        await asyncio.to_thread(command.downgrade, config, "0023_workbench_rest")
        downgraded = {row["name"]: row["method"] for row in await connection.fetch(columns)}
        added_since = {"webhooks.idempotency_key", "webhooks.request_hash", "batches.cancel_seen"}
        assert upgraded.keys() - downgraded.keys() == added_since
        assert downgraded.keys() <= upgraded.keys()
        assert set(downgraded.values()) == {""}  # none set: the server's default_toast_compression
    finally:
        await connection.close()


async def test_existing_deletions_are_numbered_per_key_in_the_order_they_were_made(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0024_lz4_compression")
    alice, bob = uuid.uuid4(), uuid.uuid4()
    connection = await asyncpg.connect(dsn)
    try:
        for key in (alice, bob):
            await connection.execute(
                "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', $2)", key, key.hex
            )
        for key in (alice, bob, bob, alice, alice):  # one sequence of ids for both keys
            await connection.execute(
                "INSERT INTO job_deletions (job_id, mode, deleted_by_key_id, row_counts)"
                " VALUES ($1, 'generate', $2, '{}')",
                uuid.uuid4(),
                key,
            )

        await asyncio.to_thread(command.upgrade, config, "head")
        numbered = await connection.fetch(
            "SELECT deleted_by_key_id AS key, number FROM job_deletions ORDER BY id"
        )
        assert [(row["key"], row["number"]) for row in numbered] == [
            (alice, 1),
            (bob, 1),
            (bob, 2),
            (alice, 2),
            (alice, 3),
        ]
        await asyncio.to_thread(command.downgrade, config, "0024_lz4_compression")
        assert await connection.fetchval("SELECT count(*) FROM job_deletions") == 5
    finally:
        await connection.close()


async def _batches(connection: asyncpg.Connection, *statuses: tuple[str, str | None]) -> None:
    """A job of a key's, and a batch of it in each (status, provider batch id)."""
    key, job = await _job(connection)
    for status, provider_batch_id in statuses:
        await connection.execute(
            "INSERT INTO batches (id, job_id, owner_key_id, wave, endpoint, status, requests, bytes,"
            " lease_id, provider_batch_id) VALUES ($1, $2, $3, 1, 'default', $4, 1, 10, $5, $6)",
            uuid.uuid4(),
            job,
            key,
            status,
            uuid.uuid4(),
            provider_batch_id,
        )


async def _job(connection: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """A key, and a job of its: their ids."""
    key, policy_set, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await connection.execute(
        "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', $2)", key, key.hex
    )
    await connection.execute(
        "INSERT INTO policy_sets (id, name, version, description, policies) VALUES ($1, $2, 'v', '', '[]')",
        policy_set,
        policy_set.hex,
    )
    await connection.execute(
        "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
        "VALUES ($1, $2, $3, '{}', 'h', 1)",
        job,
        key,
        policy_set,
    )
    return key, job


async def test_lost_batches_are_collected_ones_again_on_the_way_down(
    old_database: tuple[Config, str],
) -> None:
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "head")
    connection = await asyncpg.connect(dsn)
    try:
        await _batches(connection, ("lost", None), ("submitted", "batch_1"))

        await asyncio.to_thread(command.downgrade, config, "0027_purge_retries")

        statuses = await connection.fetch("SELECT status FROM batches ORDER BY status")
        assert [row["status"] for row in statuses] == ["collected", "submitted"]
        assert not await connection.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'batches' AND column_name = 'lease_id'"
        )
    finally:
        await connection.close()


async def test_batches_of_older_releases_are_looked_for_before_their_create(
    old_database: tuple[Config, str],
) -> None:
    """An older release searched before every create and may have sent one; its workers go on
    writing batches during a rolling upgrade, without the new column: all of those are
    searched for. Only a batch this release uploaded is known to have no create sent."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0029_batch_refusals")
    connection = await asyncpg.connect(dsn)
    try:
        await _batches(connection, ("uploaded", None))
        await asyncio.to_thread(command.upgrade, config, "head")
        await _batches(connection, ("uploaded", None))  # as an older worker writes it

        assert await connection.fetchval("SELECT bool_or(create_unsent) FROM batches") is False
        await asyncio.to_thread(command.downgrade, config, "0029_batch_refusals")
    finally:
        await connection.close()


async def test_jobs_of_older_releases_may_hold_the_legacy_request_hash(
    old_database: tuple[Config, str],
) -> None:
    """Jobs stored before 0038, and those an older release goes on inserting during a rolling
    upgrade (without the new column), may hold app/idempotency.py's legacy hash: their
    replays still try it. Only a job this release stores is known not to."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0037_batch_lost_cancel")
    connection = await asyncpg.connect(dsn)
    try:
        await _job(connection)
        await asyncio.to_thread(command.upgrade, config, "head")
        await _job(connection)  # as an older API process inserts it

        marks = await connection.fetch("SELECT request_hash_may_be_legacy FROM jobs")
        assert [row["request_hash_may_be_legacy"] for row in marks] == [True, True]
        await asyncio.to_thread(command.downgrade, config, "0037_batch_lost_cancel")
    finally:
        await connection.close()


async def test_reviews_keep_a_deleted_webhooks_id_and_lose_it_on_the_way_down(
    old_database: tuple[Config, str],
) -> None:
    """A revoked webhook may be deleted while the reviews it delivered stay naming it; the
    older release's foreign key needs them to name none."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0031_items_unfinished_index")
    connection = await asyncpg.connect(dsn)
    try:
        key, policy_set, job, item = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES ($1, 'k', 'p', $2)", key, key.hex
        )
        await connection.execute(
            "INSERT INTO policy_sets (id, name, version, description, policies)"
            " VALUES ($1, 'p', 'v', '', '[]')",
            policy_set,
        )
        await connection.execute(
            "INSERT INTO jobs (id, owner_key_id, policy_set_id, plan, request_hash, item_count) "
            "VALUES ($1, $2, $3, '{}', 'h', 1)",
            job,
            key,
            policy_set,
        )
        await connection.execute(
            "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, "
            "failures, enqueues) VALUES ($1, $2, 0, 'p', '{}', 'completed', 'done', 1, 0, 1)",
            item,
            job,
        )
        webhooks = {}
        for name in ("deleted", "kept"):
            webhooks[name] = uuid.uuid4()
            await connection.execute(
                "INSERT INTO webhooks (id, owner_key_id, source, name, secret_hash, revoked_at)"
                " VALUES ($1, $2, 'label_studio', $3, 'h', now())",
                webhooks[name],
                key,
                name,
            )
            await connection.execute(
                "INSERT INTO annotations (id, owner_key_id, item_id, job_id, source, external_id, "
                "webhook_id, annotator, annotated_at, verdict, flagged_thoughts, raw) "
                "VALUES ($1, $2, $3, $4, 'label_studio', $5, $6, 'a', now(), 'accept', '[]', '{}')",
                uuid.uuid4(),
                key,
                item,
                job,
                name,
                webhooks[name],
            )

        await asyncio.to_thread(command.upgrade, config, "head")
        await connection.execute("DELETE FROM webhooks WHERE id = $1", webhooks["deleted"])
        named = "SELECT external_id, webhook_id FROM annotations ORDER BY external_id"
        assert [tuple(row) for row in await connection.fetch(named)] == [
            ("deleted", webhooks["deleted"]),
            ("kept", webhooks["kept"]),
        ]

        await asyncio.to_thread(command.downgrade, config, "0031_items_unfinished_index")

        assert [tuple(row) for row in await connection.fetch(named)] == [
            ("deleted", None),
            ("kept", webhooks["kept"]),
        ]
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await connection.execute("DELETE FROM webhooks WHERE id = $1", webhooks["kept"])
    finally:
        await connection.close()


async def test_the_outage_waits_migration_leaves_an_items_outage_clock_as_it_was_both_ways(
    old_database: tuple[Config, str],
) -> None:
    """Its wait since is then measured from its run's start (items.end_in_outage); on the way
    down the older release counts from the mark as it is."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0033_webhook_deletion")
    connection = await asyncpg.connect(dsn)
    try:
        _, job = await _job(connection)
        since = await connection.fetchval(
            "INSERT INTO items (id, job_id, position, prompt, metadata, status, stage, attempts, failures,"
            " enqueues, outage_claims, llm_unavailable_since) VALUES ($1, $2, 0, 'p', '{}', 'queued',"
            " 'intent', 1, 0, 1, 1, now() - interval '2 hours') RETURNING llm_unavailable_since",
            uuid.uuid4(),
            job,
        )
        outage = "SELECT llm_unavailable_since, llm_unavailable_seen_at FROM items"

        await asyncio.to_thread(command.upgrade, config, "head")
        assert tuple(await connection.fetchrow(outage)) == (since, None)

        await asyncio.to_thread(command.downgrade, config, "0033_webhook_deletion")
        with pytest.raises(asyncpg.UndefinedColumnError):
            await connection.fetchrow(outage)
        assert await connection.fetchval("SELECT llm_unavailable_since FROM items") == since
    finally:
        await connection.close()


async def test_callback_deliveries_get_their_jobs_owner_also_when_an_older_release_writes_them(
    old_database: tuple[Config, str],
) -> None:
    """The claims take the keys in turns along an index of each owner's deliveries: one
    without its owner would never be claimed, and an older release's workers write them so
    during a rolling upgrade."""
    config, dsn = old_database
    await asyncio.to_thread(command.upgrade, config, "0038_request_hash_scheme")
    connection = await asyncpg.connect(dsn)
    try:
        written = (
            "INSERT INTO callback_deliveries (id, job_id, url, payload, status, attempts)"
            " VALUES ($1, $2, 'http://h/', '{}', 'pending', 0)"
        )
        (key, job), (later_key, later_job) = await _job(connection), await _job(connection)
        await connection.execute(written, uuid.uuid4(), job)

        await asyncio.to_thread(command.upgrade, config, "head")
        await connection.execute(written, uuid.uuid4(), later_job)  # as an older worker writes it

        owners = await connection.fetch("SELECT job_id, owner_key_id FROM callback_deliveries")
        assert {row["job_id"]: row["owner_key_id"] for row in owners} == {job: key, later_job: later_key}
        await asyncio.to_thread(command.downgrade, config, "0038_request_hash_scheme")
        assert await connection.fetchval("SELECT count(*) FROM callback_deliveries") == 2
    finally:
        await connection.close()
