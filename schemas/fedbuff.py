"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) as fedstream runs it (pure).

Devices train on whichever model version they have; a region folds each update it takes into its
batch ``m`` times, where ``m`` is the update's **staleness multiplicity**: with the region on round
``r`` and the update trained for round ``b`` (staleness ``t = r - b``, at most
``max_staleness``), ``m = max(1, round(scale / (1 + t) ** exponent))``. Adding a ciphertext ``m``
times multiplies every packed lane *and* the encrypted weight by the integer ``m``, so the global
decodes ``sum_i m_i w_i delta_i / sum_i m_i w_i`` exactly, and the lane planner's summand budget
simply counts ``sum_i m_i`` (:func:`check_budget`). The global steps after ``buffer_size``
updates (or its deadline), in the order the partials topic gives, cutting the topic between
records so that a restart replays exactly the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage, Reason


@dataclass(frozen=True)
class FedBuff:
    """A federation's FedBuff settings (``RoundTask.fedbuff`` on the wire)."""

    buffer_size: int = 10
    max_staleness: int = 4
    staleness_scale: int = 4
    staleness_exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.max_staleness < 0 or not 1 <= self.staleness_scale <= 64 \
                or not 0 <= self.staleness_exponent <= 8:
            raise InvalidMessage(Reason.BAD_PARAMS, f"FedBuff settings out of range: {self}")

    def multiplicity(self, staleness: int) -> int:
        """How many times an update ``staleness`` rounds old counts (``scale`` when fresh)."""
        if not 0 <= staleness <= self.max_staleness:
            raise InvalidMessage(Reason.LATE, f"staleness {staleness} is outside "
                                 f"0..{self.max_staleness}")
        return max(1, round(self.staleness_scale / (1 + staleness) ** self.staleness_exponent))

    def spec(self) -> pb.FedBuffSpec:
        return pb.FedBuffSpec(buffer_size=self.buffer_size, max_staleness=self.max_staleness,
                              staleness_scale=self.staleness_scale,
                              staleness_exponent=self.staleness_exponent)

    @classmethod
    def from_task(cls, task: pb.RoundTask) -> FedBuff | None:
        """The task's FedBuff settings, or ``None`` for a synchronous round."""
        if not task.HasField("fedbuff"):
            return None
        f = task.fedbuff
        return cls(f.buffer_size, f.max_staleness, f.staleness_scale, f.staleness_exponent)


def check_budget(fb: FedBuff, max_summands: int, num_chunks: int) -> None:
    """Refuse FedBuff settings the codec cannot sum exactly: one server step may hold up to
    ``buffer_size`` fresh updates (each ``staleness_scale`` summands) plus one more, and each
    update must be one chunk (so that the global can cut the partials topic between records)."""
    need = (fb.buffer_size + 1) * fb.staleness_scale
    if need > max_summands:
        raise ValueError(f"FedBuff: a step of {fb.buffer_size} updates weighted up to "
                         f"{fb.staleness_scale} needs codec.max_summands >= {need}, "
                         f"not {max_summands}")
    if num_chunks != 1:
        raise ValueError(f"FedBuff needs every update in one chunk (this model needs "
                         f"{num_chunks}): raise codec.chunk_bytes")
