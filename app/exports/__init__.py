"""Exports of a job's results as training-data files: pure formatting (a stored row to a
record, records to bytes), the registry of formats, and the flow that turns the store's
rows into a file's bytes (`streaming`). No SQL, no HTTP: the store reads the rows
(app.store.exports) and the API sends the bytes. The one exception is the full record
(`jsonl`, `parquet`): the store has Postgres write it as JSON text
(app.store.exports._full_cot), and FULL_COT_SCHEMA here is its schema."""
