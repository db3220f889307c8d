"""Running sums of whole, verified updates (or partials), kept deserialized.

An :class:`Accumulator` holds one summed ciphertext list (or int64 vector) per chunk index. It
folds only whole updates whose chunks :func:`schemas.verify.verify_chunk` has already checked and
loaded, so adding cannot fail half-way: every chunk sum always holds the same updates.
``payloads()`` serializes the sums again; ``decode()`` decrypts them (secret context only).

Example:
    >>> acc = Accumulator(codec)
    >>> acc.add(whole(codec, {i: verify_chunk(codec, p, index=i, summands=1)
    ...                       for i, p in enumerate(payloads)}))
    >>> acc.summands, len(acc.payloads()) == codec.num_chunks
    (1, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas.errors import InvalidMessage, Reason
from schemas.framing import MODE_PLAIN, Chunk

if TYPE_CHECKING:
    from schemas.codec import Codec


class Accumulator:
    """Per-chunk running sum of whole updates (see module docstring)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.sums: list[Any] = []      # per chunk: list of SEAL ciphertexts, or an int64 vector
        self.weight = 0                # plain mode: the summed weight (CKKS: encrypted inside)
        self.summands = 0

    def add(self, chunks: Sequence[Chunk], times: int = 1) -> None:
        """Fold one whole, verified update or partial (``verify.whole``'s output), ``times``
        times (an integer multiplicity: every lane and the weight are multiplied exactly)."""
        codec = self.codec
        if len(chunks) != codec.num_chunks:
            raise InvalidMessage(Reason.INCOMPLETE,
                                 f"{len(chunks)} chunks, codec has {codec.num_chunks}")
        if times < 1:
            raise InvalidMessage(Reason.BAD_PARAMS, f"multiplicity {times} is not positive")
        total = self.summands + chunks[0].summands * times
        if total > codec.params.max_summands:
            raise InvalidMessage(Reason.TOO_MANY_SUMMANDS, f"sum would hold {total} updates, "
                                 f"limit {codec.params.max_summands}")
        if codec.mode == MODE_PLAIN:
            vals = [c.ints().astype(np.int64) * times for c in chunks]
            if self.sums:
                for acc, v in zip(self.sums, vals):
                    acc += v
            else:
                self.sums = vals
            self.weight += chunks[0].weight * times
        else:
            cts = [c.cts for c in chunks]
            if any(c is None for c in cts):
                raise InvalidMessage(Reason.CORRUPT, "chunk was not verified (no ciphertexts)")
            seal = codec.he().seal
            ev = seal.evaluator
            todo = times
            if not self.sums:
                if times == 1:
                    self.sums = [list(c) for c in cts]  # type: ignore[arg-type]
                    todo = 0
                else:  # new ciphertexts 2 * ct (never add a chunk's own ciphertext to itself)
                    from tenseal import sealapi

                    sums = []
                    for c in cts:
                        row = []
                        for ct in c:  # type: ignore[union-attr]
                            out = sealapi.Ciphertext(seal.context)
                            ev.add(ct, ct, out)
                            row.append(out)
                        sums.append(row)
                    self.sums = sums
                    todo -= 2
            for _ in range(todo):  # m-fold addition: exact, and no plaintext encoding needed
                for acc_list, new in zip(self.sums, cts):
                    for acc, ct in zip(acc_list, new):  # type: ignore[arg-type]
                        ev.add_inplace(acc, ct)
        self.summands = total

    def add_payloads(self, payloads: Sequence[bytes], summands: int = 1) -> None:
        """Verify and fold one whole update given as payloads (tests, simulation)."""
        from schemas.verify import verify_chunk, whole

        chunks = {i: verify_chunk(self.codec, p, index=i, summands=summands)
                  for i, p in enumerate(payloads)}
        self.add(whole(self.codec, chunks))

    @classmethod
    def total(cls, codec: Codec, parts: Sequence[Accumulator]) -> Accumulator:
        """A new accumulator holding the sum of ``parts`` (which are left unchanged)."""
        out = cls(codec)
        live = [p for p in parts if p.summands]
        if not live:
            return out
        out.summands = sum(p.summands for p in live)
        out.weight = sum(p.weight for p in live)
        if codec.mode == MODE_PLAIN:
            out.sums = [sum((p.sums[i] for p in live[1:]), live[0].sums[i].copy())
                        for i in range(codec.num_chunks)]
            return out
        if len(live) == 1:
            out.sums = [list(s) for s in live[0].sums]  # shared, read-only use (decode)
            return out
        from tenseal import sealapi

        seal = codec.he().seal
        sums = []
        for i in range(codec.num_chunks):
            row = []
            for t in range(len(live[0].sums[i])):
                ct = sealapi.Ciphertext(seal.context)
                seal.evaluator.add(live[0].sums[i][t], live[1].sums[i][t], ct)
                for p in live[2:]:
                    seal.evaluator.add_inplace(ct, p.sums[i][t])
                row.append(ct)
            sums.append(row)
        out.sums = sums
        return out

    def payloads(self) -> list[bytes]:
        """The running sum as one payload per chunk index."""
        codec = self.codec
        if not self.summands:
            raise InvalidMessage(Reason.INCOMPLETE, "nothing summed yet")
        if codec.mode == MODE_PLAIN:
            return [codec.framer.frame_plain(i, self.summands, self.weight if i == 0 else 0,
                                             v.astype("<i8"))
                    for i, v in enumerate(self.sums)]
        seal = codec.he().seal
        return [codec.framer.frame_cts(i, self.summands, [seal.save(ct) for ct in row])
                for i, row in enumerate(self.sums)]

    def decode(self) -> tuple[np.ndarray, int]:
        """Exact int64 sums and weight sum (decrypts with a secret context); see Codec.decode."""
        if not self.summands:
            raise InvalidMessage(Reason.INCOMPLETE, "nothing summed yet")
        return self.codec.decode_sums(self.sums, self.weight, self.summands)
