"""The one exception type for input that fedstream refuses.

Every tier rejects bad input (truncated, tampered, wrong fingerprint, wrong schema version,
oversized, replayed, wrong round, unsigned, NaN/Inf, ...) by raising :class:`InvalidMessage`.
The services catch it, log ``reason``, bump a counter labelled with ``reason`` and carry on; they
never crash and never silently drop.
"""

from __future__ import annotations


class InvalidMessage(ValueError):
    """Input that fedstream refuses.

    Args:
        reason: a short, stable, machine-readable label (used as a metrics label), e.g.
            ``"truncated"``, ``"bad_signature"``, ``"wrong_fingerprint"``.
        detail: a human-readable sentence that says what was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
