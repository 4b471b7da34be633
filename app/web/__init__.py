"""The read-only web viewer (/view): server-rendered pages over the same store and redaction
rules as the API."""
