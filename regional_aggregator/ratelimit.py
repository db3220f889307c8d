"""Per-device token buckets: a stolen device cannot make its region work at line rate.

Each key (a verified signer) gets ``burst`` tokens that refill at ``rate`` per second; a message
takes one. An honest device sends ``num_chunks`` messages per round and republishes them after a
reconnect, far below the defaults; a replay flood is refused (counted as ``rate_limited``) after
the burst. Keys are verified identities of the region, so the table is bounded by the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBuckets:
    """``take(key)`` is True while ``key`` has a token (one is used), else False."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._clock = float(rate), float(burst), clock
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: str) -> bool:
        now = self._clock()
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        return ok
