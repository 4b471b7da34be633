"""The labeling-tool round trip: Label Studio and Argilla. Formatting and parsing: a stored
CoT to a tool's task or record, and a tool's annotations back to `Review`s; then the import
flow (`imports`) checks the reviews against the owner's CoTs and has the store keep them.
No SQL, no HTTP: the store reads and writes the rows, the API moves the bytes."""
