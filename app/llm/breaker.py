"""A circuit breaker per endpoint, in one worker process: an endpoint that is down is not
tried again by every item in turn.

Without it, each item whose endpoint is down spends its client's retries (4, backing off up
to 30 s, each attempt up to the 120 s timeout on a hung endpoint) holding a worker slot, then
comes back after its Retry and does it again, while other endpoints' items wait for those
slots (bench/RESULTS.md, "An endpoint down beside a healthy one"). After FAILURES_TO_OPEN
attempts in a row failed as a down endpoint fails (a 5xx, a timeout, no connection; a 429
or any other answer shows it up), the breaker opens: attempts are refused, unsent, for
`open_s`, and their items go back to the queue at once. Then one attempt goes as a probe
while the others are still refused; an answer closes the breaker, a failure opens it again.
An attempt that ends without a verdict (cancelled, the limiter's Redis away) only lets the
next one probe.

Each process learns by itself: no Redis round trip per call, and a process needs only
FAILURES_TO_OPEN of its own failures. Random faults hardly ever trip it: with 8 % of answers
5xx, ten in a row come once in 10^11 attempts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

FAILURES_TO_OPEN = 10
# The attempt outcomes (the client's fault kinds) of an endpoint that is down, and those of
# one that answered: the rest (cancelled, limiter) say nothing either way.
DOWN = frozenset({"server_error", "timeout", "connection"})
ANSWERED = frozenset({"ok", "rate_limited", "bad_body", "rejected"})


@dataclass
class _State:
    failures: int = 0  # attempts in a row that failed as a down endpoint fails
    open_until: float = 0.0  # time.monotonic(); attempts are refused until then once open
    probing: bool = False  # an attempt is out as the probe of an open breaker


class EndpointBreaker:
    def __init__(self, open_s: float) -> None:
        """`open_s`: how long an open breaker refuses attempts before it lets a probe go."""
        self._open_s = open_s
        self._states: defaultdict[str, _State] = defaultdict(_State)

    def refused_for_s(self, endpoint: str) -> float:
        """0: send the attempt (as the probe, if the breaker is open and one is due). Else
        it is refused: about how long until the endpoint is tried again."""
        state = self._states[endpoint]
        if state.failures < FAILURES_TO_OPEN:
            return 0.0
        now = time.monotonic()
        if now < state.open_until:
            return state.open_until - now
        if state.probing:
            return self._open_s
        state.probing = True
        return 0.0

    def ended(self, endpoint: str, outcome: str) -> None:
        """An attempt sent to `endpoint` ended with `outcome` (the client's metrics label)."""
        state = self._states[endpoint]
        state.probing = False
        if outcome in ANSWERED:
            state.failures = 0
        elif outcome in DOWN:
            state.failures += 1
            if state.failures >= FAILURES_TO_OPEN:
                state.open_until = time.monotonic() + self._open_s
