"""Unicode's bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to
U+2069): a terminal or browser that applies one shows the text after it reordered, so what is
read is not what is there (Trojan Source). The CLI and the viewer show them in text from the
server as escapes instead."""

from __future__ import annotations

BIDI_CONTROLS = frozenset((*range(0x202A, 0x202F), *range(0x2066, 0x206A)))
