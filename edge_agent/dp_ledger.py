"""A device's DP-SGD privacy ledger: every noisy local step it ever took, kept across restarts.

Example-level DP-SGD (``privacy.mode = "example"``) spends privacy of the device's own examples
at every noisy step. The epsilon a device reports must cover all of them, not only the steps of
its current process, so the steps are recorded in a small JSON file before the update they made
leaves the device (a crash in between over-counts, never under-counts):

    {"version": 1, "device_id": "dev-7", "runs": [{"q": 0.125, "z": 1.1, "steps": 40}, ...]}

One run per (sampling rate ``q = batch / n``, noise multiplier ``z``): a device whose data grows,
or a federation that changes the multiplier, composes the different steps exactly
(:func:`schemas.dp.dpsgd_runs_epsilon`, dp-accounting's RDP accountant). Writes are atomic
(temporary file, fsync, rename). A ledger that does not parse, or is another device's, stops the
device at start with an error naming the file: starting a fresh one would under-report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_RUNS = 10_000


class DpLedger:
    """The ledger at ``path`` for ``device_id`` (empty if the file does not exist).

    Raises:
        ValueError: the file exists but is not a ledger of ``device_id``.
    """

    def __init__(self, path: Path, device_id: str) -> None:
        self.path, self.device_id = Path(path), device_id
        self.runs: dict[tuple[float, float], int] = {}
        if self.path.exists():
            self.runs = self._load()

    def _load(self) -> dict[tuple[float, float], int]:
        where = f"DP-SGD privacy ledger {self.path}"
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") != 1 or doc.get("device_id") != self.device_id:
                raise ValueError(f"not a version-1 ledger of {self.device_id!r}")
            # a ledger exists only where DP-SGD ran: dp-accounting is needed anyway
            from schemas.dp import check_dpsgd_run

            runs: dict[tuple[float, float], int] = {}
            for r in doc["runs"][:MAX_RUNS + 1]:
                q, z, steps = check_dpsgd_run(r["q"], r["z"], r["steps"])
                runs[q, z] = runs.get((q, z), 0) + steps
            if len(runs) > MAX_RUNS:
                raise ValueError(f"more than {MAX_RUNS} runs")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{where} is unusable ({exc}); a fresh ledger would under-report "
                             "epsilon: restore it, or move it away knowingly") from None
        return runs

    @property
    def steps(self) -> int:
        """Noisy steps recorded so far."""
        return sum(self.runs.values())

    def record(self, q: float, z: float, steps: int) -> None:
        """Add ``steps`` steps at sampling rate ``q`` and multiplier ``z``, durably.

        Raises:
            OSError: the ledger cannot be written (nothing is recorded then).
        """
        runs = dict(self.runs)
        runs[q, z] = runs.get((q, z), 0) + steps
        doc = {"version": 1, "device_id": self.device_id,
               "runs": [{"q": q_, "z": z_, "steps": s} for (q_, z_), s in sorted(runs.items())]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.runs = runs

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of every recorded step (0 with none)."""
        if not self.runs:
            return 0.0
        from schemas.dp import dpsgd_runs_epsilon  # dp-accounting only when DP is on

        return dpsgd_runs_epsilon([(q, z, s) for (q, z), s in self.runs.items()], delta)
