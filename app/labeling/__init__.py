"""The labeling-tool round trip: Label Studio and Argilla. Pure formatting and parsing: a
stored CoT to a tool's task or record, and a tool's annotations back to `Review`s. No SQL,
no HTTP: the store checks and keeps the reviews, the API moves the bytes."""
