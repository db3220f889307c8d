"""Verification of update and partial chunks, and the bounds check of a decoded sum.

Both tiers call the same two functions, so a region and the global agree on what a well-formed
chunk is:

* :func:`verify_chunk` checks everything visible about one chunk before it may change any state:
  frame, checksum, layout version, mode, model size, HE fingerprint, plan digest, chunk index,
  the summand count its sender must have (``1`` for a device's update, the number of agents a
  partial names), and that every ciphertext deserializes into the round's CKKS context. The
  result holds the loaded ciphertexts, so folding a verified chunk cannot fail.
* :func:`check_sum` checks a decrypted sum against what its contributors could honestly produce
  (:func:`schemas.plan.l2_bound`): the weight sum equals the clear weights the regions checked,
  and the L2 norm is within the clipping bound. A sum outside is refused with
  :class:`~schemas.errors.BoundsExceeded`, so the global isolates it instead of using it.

Example:
    >>> chunks = {i: verify_chunk(codec, p, index=i, summands=1) for i, p in enumerate(payloads)}
    >>> acc.add(whole(codec, chunks))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from schemas.errors import BoundsExceeded, InvalidMessage, Reason
from schemas.framing import MODE_CKKS, Chunk
from schemas.plan import l2_bound

if TYPE_CHECKING:
    from schemas.codec import Codec


def verify_chunk(codec: Codec, payload: bytes, *, index: int, summands: int,
                 weight: int | None = None) -> Chunk:
    """Parse and check one chunk; load its ciphertexts.

    Args:
        index: the chunk index the (signed) message header claims.
        summands: how many updates the sender's message says this chunk sums.
        weight: plain mode, chunk 0: the clear weight sum the sender declared.

    Raises:
        InvalidMessage: any reason of payload parsing, ``chunk_index_mismatch``,
            ``bad_summands``, ``bad_weight`` or ``corrupt`` (a ciphertext that does not load).
    """
    if not 0 <= index < codec.num_chunks:
        raise InvalidMessage(Reason.CHUNK_INDEX_OUT_OF_RANGE,
                             f"chunk {index} of {codec.num_chunks}")
    return verify_parsed(codec, codec.framer.parse(payload), index=index, summands=summands,
                         weight=weight)


def verify_parsed(codec: Codec, ch: Chunk, *, index: int, summands: int,
                  weight: int | None = None) -> Chunk:
    """:func:`verify_chunk` on a chunk already parsed by ``codec.framer.parse`` (callers that
    need the header first, such as ``Codec.add``, parse once)."""
    if ch.index != index:
        raise InvalidMessage(Reason.CHUNK_INDEX_MISMATCH,
                             f"payload of chunk {ch.index} labelled as chunk {index}")
    if ch.summands != summands:
        raise InvalidMessage(Reason.BAD_SUMMANDS,
                             f"payload sums {ch.summands} updates, its sender vouches for "
                             f"{summands}")
    if codec.mode == MODE_CKKS:
        seal, scale = codec.he().seal, codec.plan.he_scale
        ch.cts = [seal.load(b, scale) for b in ch.ciphertexts()]
        ch.items = None  # the loaded ciphertexts replace the bytes
    else:
        if weight is not None and index == 0 and ch.weight != weight:
            raise InvalidMessage(Reason.BAD_WEIGHT,
                                 f"plain weight {ch.weight} differs from the declared {weight}")
        # a trusted (plaintext) tier can see every value: check it against the round's range
        bound = codec.params.lane_max(summands)  # DP noise included
        if ch.ints().size and int(np.abs(ch.ints().astype(np.int64)).max()) > bound:
            raise InvalidMessage(Reason.OUT_OF_RANGE,
                                 f"a value exceeds {bound}, the bound of a sum of {summands}")
    return ch


def whole(codec: Codec, chunks: Mapping[int, Chunk]) -> list[Chunk]:
    """The verified chunks of one update or partial in order; all must be there."""
    if sorted(chunks) != list(range(codec.num_chunks)):
        raise InvalidMessage(Reason.INCOMPLETE,
                             f"chunks {sorted(chunks)} of {codec.num_chunks}")
    counts = {c.summands for c in chunks.values()}
    if len(counts) != 1:
        raise InvalidMessage(Reason.BAD_SUMMANDS, f"chunks sum different counts {counts}")
    return [chunks[i] for i in range(codec.num_chunks)]


def check_sum(codec: Codec, qsum: np.ndarray, weight: int, *, summands: int,
              clear_weight: int) -> None:
    """Refuse a decoded sum its ``summands`` contributors could not have made honestly.

    Raises:
        BoundsExceeded: ``weight_mismatch`` when the decrypted weight sum differs from the clear
            weights the regions range-checked; ``l2_bound`` when ``||qsum||_2`` exceeds
            :func:`schemas.plan.l2_bound` for that weight.
    """
    if weight != clear_weight:
        raise BoundsExceeded(Reason.WEIGHT_MISMATCH,
                             f"decrypted weight sum {weight}, the devices declared "
                             f"{clear_weight}")
    bound = l2_bound(codec.params, clear_weight, summands, codec.num_params)
    norm = float(np.linalg.norm(np.asarray(qsum, np.float64)))
    if not norm <= bound:
        raise BoundsExceeded(Reason.L2_BOUND,
                             f"sum of {summands} updates has L2 norm {norm:.1f}, honest ones "
                             f"stay within {bound:.1f}")
