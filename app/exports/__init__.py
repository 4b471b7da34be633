"""Exports of a job's results as training-data files: pure formatting (a stored row to a
record, records to bytes) and the registry of formats. No SQL, no HTTP: the store streams
the rows and the API streams the bytes. The one exception is the full record (`jsonl`,
`parquet`): the store has Postgres write it as JSON text (app.store.exports._full_cot), and
FULL_COT_SCHEMA here is its schema."""
