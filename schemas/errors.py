"""The named reasons fedstream refuses input for, and the two exception types that carry them.

Every tier rejects bad input (truncated, tampered, wrong fingerprint, wrong schema version,
oversized, replayed, wrong round, unsigned, NaN/Inf, out of bounds, ...) by raising
:class:`InvalidMessage` with one :class:`Reason`. The services catch it, log ``reason``, bump
``fedstream_rejected_total{service, reason}`` and carry on; they never crash and never silently
drop. A sum that decodes but breaks the bounds its contributors must respect raises
:class:`BoundsExceeded` (an :class:`InvalidMessage`): the global tier then isolates the group
that caused it instead of using the sum.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why an input was refused: the ``reason`` label of ``fedstream_rejected_total``."""

    # envelope and signature
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_VERSION = "wrong_version"
    WRONG_KIND = "wrong_kind"
    UNSIGNED = "unsigned"
    UNKNOWN_SIGNER = "unknown_signer"
    BAD_SIGNATURE = "bad_signature"
    SENDER_MISMATCH = "sender_mismatch"
    UNAUTHORIZED = "unauthorized"
    WRONG_TOPIC = "wrong_topic"            # signed for, or published on, another topic
    STALE_VERSION = "stale_version"        # a model version older than the newest seen
    # round membership
    LATE = "late"
    WRONG_ROUND = "wrong_round"
    NOT_SELECTED = "not_selected"
    QUARANTINED = "quarantined"
    ROUND_CLOSED = "round_closed"
    INCOMPLETE = "incomplete"
    TOO_FEW_AGENTS = "too_few_agents"
    RATE_LIMITED = "rate_limited"
    # payload layout
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    BAD_MAGIC = "bad_magic"
    WRONG_MODE = "wrong_mode"
    WRONG_NUM_PARAMS = "wrong_num_params"
    WRONG_FINGERPRINT = "wrong_fingerprint"
    PLAN_MISMATCH = "plan_mismatch"
    CHUNK_MISMATCH = "chunk_mismatch"
    WRONG_CHUNK_COUNT = "wrong_chunk_count"
    CHUNK_INDEX_OUT_OF_RANGE = "chunk_index_out_of_range"
    CHUNK_INDEX_MISMATCH = "chunk_index_mismatch"
    TOO_MANY_SUMMANDS = "too_many_summands"
    BAD_SUMMANDS = "bad_summands"          # a payload's summand count differs from its senders
    AGENTS_MISMATCH = "agents_mismatch"
    AGENT_IN_TWO_REGIONS = "agent_in_two_regions"
    BAD_GROUP = "bad_group"
    # values
    BAD_WEIGHT = "bad_weight"
    ZERO_WEIGHT = "zero_weight"
    NAN_OR_INF = "nan_or_inf"
    BAD_DELTA = "bad_delta"
    OUT_OF_RANGE = "out_of_range"
    INEXACT_SUM = "inexact_sum"
    LANE_BOUND = "lane_bound"              # a decoded lane sum beyond summands * (2**(b-1)-1)
    WEIGHT_MISMATCH = "weight_mismatch"    # encrypted weight sum != the checked clear weights
    L2_BOUND = "l2_bound"                  # the sum's L2 norm beyond what clipping allows
    EXCLUDED_GROUP = "excluded_group"      # an agent left out of a round with its failing group
    # configuration and keys
    BAD_PARAMS = "bad_params"
    UNSUMMABLE_PLAN = "unsummable_plan"
    BAD_CONTEXT = "bad_context"
    NO_SECRET_KEY = "no_secret_key"
    BAD_OPTIMIZER_STATE = "bad_optimizer_state"
    BAD_COMMAND = "bad_command"
    UNKNOWN_VERSION = "unknown_version"    # a rollback to a version that was never published
    # the fleet: enrolment, revocation and key rotation (schemas/fleet.py)
    REVOKED = "revoked"                    # signed by an identity the operator revoked
    ROTATED_KEY = "rotated_key"            # signed with a key not valid for the message's round
    BAD_RECORD = "bad_record"              # a fleet record that is malformed or contradicts the store
    # the device's own project and data
    TASK_MISMATCH = "task_mismatch"        # the round task names another project / model / plan
    DATA_ERROR = "data_error"              # the device's local data is missing or unusable


class InvalidMessage(ValueError):
    """Input that fedstream refuses.

    Args:
        reason: one :class:`Reason` (a plain string is accepted if it names one; anything else
            is a programming error and raises ``ValueError`` at once).
        detail: a human-readable sentence that says what was wrong.
    """

    def __init__(self, reason: Reason | str, detail: str) -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}")


class BoundsExceeded(InvalidMessage):
    """A decrypted sum that its contributors could not have produced honestly.

    Raised by the decode checks (lane range, weight sum, L2 norm); the global tier answers it by
    testing smaller groups (never fewer than the privacy floor) and leaving out the failing one.
    """
