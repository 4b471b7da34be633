"""When to send a second copy of an LLM request that runs long (a hedged request).

A hung request (the server accepted it and says nothing) costs its whole timeout before the
retry, and that timeout must be sized for the longest legitimate reply: on a 200 ms endpoint
with a 10 s timeout, one hang on the last item's chain of calls adds 10 s to the job. Aborting
earlier would cut off slow but good replies; hedging does not. Once a request has run past
`factor` times the recent 95th percentile of the same endpoint and role (and at least
`min_delay_s`), the client sends the same request again and takes whichever answers first,
cancelling the other ("The Tail at Scale", Dean and Barroso, 2013).

A hedge is a second call the provider may bill, so hedges are budgeted: each request sent
earns `budget` of a hedge (at most BURST kept), and a hedge spends one; with a budget of
0.05, at most about one request in twenty is hedged, however slow the endpoint gets. No
hedge is sent before MIN_SAMPLES replies of that endpoint and role were timed, nor when the
delay would reach the timeout. A request sent before then is not given up on: while it
runs, the client looks again every `min_delay_s` (at least LOOK_AGAIN_MIN_S), so the first
wave of a role's requests (a job's first items all send it before any reply is back; a third
of the stalls of the bench's 500-item everyday run hit one) is hedged at the first look after
the wave's other replies give a delay and it has run past it. The delay is read again when a
hedge comes due, so one learnt from a wave's fastest replies does not stand. The state is per
process: each worker learns its latencies.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Replies timed per endpoint and role, the fewest that give a delay, and how many new
# ones before the percentile is recomputed (sorting SAMPLES on every call would cost more
# than the call's own bookkeeping).
SAMPLES = 200
MIN_SAMPLES = 20
RECOMPUTE_EVERY = 10
QUANTILE = 0.95
# Hedges that may be sent at once after a quiet spell, before the budget's rate applies.
BURST = 10.0
# A request sent before its endpoint and role gave a delay is looked at again every
# min_delay_s (no hedge goes sooner anyway), but not more often than this.
LOOK_AGAIN_MIN_S = 0.05


@dataclass
class _Latencies:
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    since_recompute: int = 0
    quantile_s: float | None = None

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.since_recompute += 1
        # The first time too: MIN_SAMPLES is at least RECOMPUTE_EVERY.
        if len(self.recent) >= MIN_SAMPLES and self.since_recompute >= RECOMPUTE_EVERY:
            ordered = sorted(self.recent)
            self.quantile_s = ordered[math.ceil(QUANTILE * len(ordered)) - 1]
            self.since_recompute = 0


class HedgePolicy:
    """Learns reply latencies per (endpoint, role) and says when, if at all, to hedge."""

    def __init__(self, factor: float, min_delay_s: float, budget: float) -> None:
        """factor: hedge once a request has run this many times the recent p95 (0: never).
        min_delay_s: never sooner than this. budget: hedges earned per request sent."""
        self.factor = factor
        self.min_delay_s = min_delay_s
        self.look_again_s = max(min_delay_s, LOOK_AGAIN_MIN_S)
        self.budget = budget
        self._latencies: dict[tuple[str, str], _Latencies] = {}
        self._tokens = BURST

    def observe(self, endpoint: str, role: str, seconds: float) -> None:
        """A reply to this endpoint and role took `seconds` from sending to its last byte."""
        self._latencies.setdefault((endpoint, role), _Latencies()).add(seconds)

    def sent(self) -> None:
        """A request was sent: it earns `budget` of a hedge."""
        self._tokens = min(BURST, self._tokens + self.budget)

    def knows(self, endpoint: str, role: str) -> bool:
        """Whether enough replies of this endpoint and role were timed to give a delay."""
        latencies = self._latencies.get((endpoint, role))
        return latencies is not None and latencies.quantile_s is not None

    def delay_s(self, endpoint: str, role: str, timeout_s: float) -> float | None:
        """How long a request may run before it is hedged, by the replies timed so far; None:
        it is not (too few timed yet, or the delay would reach the timeout)."""
        latencies = self._latencies.get((endpoint, role))
        if self.factor <= 0 or latencies is None or latencies.quantile_s is None:
            return None
        delay = max(self.min_delay_s, self.factor * latencies.quantile_s)
        return delay if delay < timeout_s else None

    def spend(self) -> bool:
        """Take one hedge from the budget; False when none is left."""
        if self._tokens < 1 - 1e-9:  # ten tenths add up to a whole one
            return False
        self._tokens -= 1
        return True

    def refund(self) -> None:
        """Give back a hedge spent but never sent."""
        self._tokens = min(BURST, self._tokens + 1)
