"""Chunk payloads: the byte layout of one chunk of an update or a sum, and its parser.

Chunk payload (layout version 2) = one zstd frame (content size + xxhash64 checksum) of::

    header, 56 bytes, little-endian ("<4sBBBBIIQII8s16s"):
      magic b"FSUC" | version u8 = 2 | mode u8 (1 = CKKS, 2 = plain) | dtype u8 (plain: 1 int8,
      2 int16, 8 int64; CKKS: 0) | reserved u8 = 0 | chunk_index u32 | num_chunks u32 |
      num_params u64 | summands u32 (updates in this sum) | items u32 (ciphertexts or values) |
      plan digest 8 bytes (SHA-256 of the codec parameters and num_params) |
      HE fingerprint 16 bytes (first half of the SHA-256 fingerprint; zeros in plain mode)
    body, CKKS:  items x (u32 length | bit-packed ciphertext, schemas.he)
    body, plain: i64 weight sum (chunk 0 only, 0 elsewhere) | items x dtype values

:class:`Framer` knows one round's layout (from the codec) and turns payloads into
:class:`Chunk` objects, refusing anything that does not fit with an
:class:`~schemas.errors.InvalidMessage` that names the reason. It never deserializes
ciphertexts; :func:`schemas.verify.verify_chunk` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from schemas.errors import InvalidMessage, Reason
from schemas.plan import Plan

MAGIC = b"FSUC"
VERSION = 2
MODE_CKKS = 1
MODE_PLAIN = 2
HEADER = struct.Struct("<4sBBBBIIQII8s16s")
LEN = struct.Struct("<I")
I64 = struct.Struct("<q")
DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 8: np.dtype("<i8")}
_ZSTD_LEVEL = 1


@dataclass
class Chunk:
    """A parsed chunk: header fields plus the body.

    ``items`` are serialized ciphertexts (CKKS), ``cts`` the same ciphertexts loaded into SEAL
    (set by :func:`schemas.verify.verify_chunk`), ``values``/``weight`` the plain body.
    """

    index: int
    summands: int
    items: list[bytes] | None = None
    values: np.ndarray | None = None
    weight: int = 0
    cts: list[Any] | None = None

    def ciphertexts(self) -> list[bytes]:
        if self.items is None:
            raise InvalidMessage(Reason.WRONG_MODE, "chunk has no ciphertexts (plain chunk)")
        return self.items

    def ints(self) -> np.ndarray:
        if self.values is None:
            raise InvalidMessage(Reason.WRONG_MODE, "chunk has no plain values (CKKS chunk)")
        return self.values


class Framer:
    """Frame and parse the chunks of one round's layout.

    Args:
        mode: :data:`MODE_CKKS` or :data:`MODE_PLAIN`.
        plan: the round's plan; num_params, num_chunks: the model size and chunk count.
        max_summands: the largest summand count a chunk header may claim.
        digest: 8-byte plan digest; fingerprint: 16-byte HE fingerprint prefix (zeros in plain).
    """

    def __init__(self, *, mode: int, plan: Plan, num_params: int, max_summands: int,
                 digest: bytes, fingerprint: bytes) -> None:
        self.mode, self.plan = mode, plan
        self.num_params, self.num_chunks = num_params, plan.num_chunks
        self.max_summands = max_summands
        self.digest, self.fingerprint = digest, fingerprint
        self._zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True,
                                            write_content_size=True)
        self._zd = zstandard.ZstdDecompressor()

    # ------------------------------------------------------------------ sizes

    def cts_in_chunk(self, index: int) -> int:
        plan = self.plan
        rpc = plan.cts_per_chunk * plan.reals_per_ct
        reals = min(rpc, plan.num_reals - index * rpc)
        return -(-reals // plan.reals_per_ct)

    def values_in_chunk(self, index: int) -> int:
        per = self.plan.params_per_chunk
        return min(per, self.num_params - index * per)

    def max_content(self) -> int:
        if self.mode == MODE_CKKS:
            return HEADER.size + self.plan.cts_per_chunk * (LEN.size + self.plan.ct_bytes)
        return HEADER.size + 8 + 8 * self.plan.params_per_chunk

    def max_payload_bytes(self) -> int:
        """Largest payload this layout accepts (bigger ones are refused as "oversized")."""
        m = self.max_content()
        return m + m // 64 + 1024

    # ------------------------------------------------------------------ writing

    def frame(self, index: int, summands: int, dtype: int, items: int, body: list[bytes]) -> bytes:
        head = HEADER.pack(MAGIC, VERSION, self.mode, dtype, 0, index, self.num_chunks,
                           self.num_params, summands, items, self.digest, self.fingerprint)
        return self._zc.compress(b"".join([head, *body]))

    def frame_cts(self, index: int, summands: int, items: list[bytes]) -> bytes:
        body = []
        for b in items:
            body.append(LEN.pack(len(b)))
            body.append(b)
        return self.frame(index, summands, 0, len(items), body)

    def frame_plain(self, index: int, summands: int, weight: int, values: np.ndarray) -> bytes:
        dtype = next(k for k, v in DTYPES.items() if v == values.dtype.newbyteorder("<"))
        return self.frame(index, summands, dtype, values.shape[0],
                          [I64.pack(weight), values.tobytes()])

    # ------------------------------------------------------------------ reading

    def _unframe(self, payload: bytes) -> tuple[tuple, memoryview]:
        """Check size, zstd frame and checksum, and the header; return (header fields, body)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidMessage(Reason.CORRUPT,
                                 f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > self.max_payload_bytes():
            raise InvalidMessage(Reason.OVERSIZED, f"payload of {len(payload)} bytes exceeds "
                                 f"{self.max_payload_bytes()}")
        if len(payload) < 18:
            raise InvalidMessage(Reason.TRUNCATED, f"payload of {len(payload)} bytes is too short")
        try:
            size = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise InvalidMessage(Reason.CORRUPT, f"not a zstd frame: {exc}") from None
        if size < 0:
            raise InvalidMessage(Reason.CORRUPT, "zstd frame does not declare its content size")
        if size > self.max_content():
            raise InvalidMessage(Reason.OVERSIZED, f"payload decompresses to {size} bytes, more "
                                 f"than {self.max_content()}")
        try:
            raw = self._zd.decompress(payload, max_output_size=self.max_content(),
                                      allow_extra_data=False)
        except zstandard.ZstdError as exc:
            msg = str(exc)
            if "full frame" in msg or "incomplete" in msg or "truncated" in msg:
                raise InvalidMessage(Reason.TRUNCATED, f"zstd frame is cut short: {msg}") from None
            raise InvalidMessage(Reason.CORRUPT, f"zstd frame is damaged: {msg}") from None
        if len(raw) < HEADER.size:
            raise InvalidMessage(Reason.TRUNCATED, "payload shorter than its header")
        h = HEADER.unpack_from(raw)
        self._check_header(h)
        return h, memoryview(raw)[HEADER.size:]

    def _check_header(self, h: tuple) -> None:
        magic, version, mode, _dtype, _res, index, num_chunks, num_params, summands, _items, \
            digest, fp = h
        if magic != MAGIC:
            raise InvalidMessage(Reason.BAD_MAGIC, f"magic {magic!r} is not {MAGIC!r}")
        if version != VERSION:
            raise InvalidMessage(Reason.WRONG_VERSION,
                                 f"layout version {version}, expected {VERSION}")
        if mode != self.mode:
            raise InvalidMessage(Reason.WRONG_MODE, f"payload mode {mode}, codec mode {self.mode}")
        if num_params != self.num_params:
            raise InvalidMessage(Reason.WRONG_NUM_PARAMS,
                                 f"payload for {num_params} params, codec has {self.num_params}")
        if fp != self.fingerprint:
            raise InvalidMessage(Reason.WRONG_FINGERPRINT,
                                 f"payload made under HE context {fp.hex()}, expected "
                                 f"{self.fingerprint.hex()}")
        if digest != self.digest:
            raise InvalidMessage(Reason.PLAN_MISMATCH, "payload made with other codec parameters")
        if num_chunks != self.num_chunks or index >= num_chunks:
            raise InvalidMessage(Reason.CHUNK_MISMATCH,
                                 f"chunk {index} of {num_chunks}, codec has {self.num_chunks}")
        if not 1 <= summands <= self.max_summands:
            raise InvalidMessage(Reason.TOO_MANY_SUMMANDS,
                                 f"payload sums {summands} updates, limit {self.max_summands}")

    def parse(self, payload: bytes) -> Chunk:
        """Parse a whole payload (ciphertexts stay serialized)."""
        h, body = self._unframe(payload)
        index, summands, items, dtype = h[5], h[8], h[9], h[3]
        if self.mode == MODE_PLAIN:
            if dtype not in DTYPES:
                raise InvalidMessage(Reason.CORRUPT, f"unknown value type {dtype}")
            want = self.values_in_chunk(index)
            if items != want:
                raise InvalidMessage(Reason.CHUNK_MISMATCH, f"chunk {index} has {items} values, "
                                     f"expected {want}")
            if len(body) != 8 + items * DTYPES[dtype].itemsize:
                raise InvalidMessage(Reason.TRUNCATED, "plain chunk body has the wrong length")
            (weight,) = I64.unpack_from(body)
            if index != 0 and weight != 0:
                raise InvalidMessage(Reason.CORRUPT, "weight outside chunk 0")
            vals = np.frombuffer(body, DTYPES[dtype], items, 8)
            return Chunk(index, summands, values=vals, weight=weight)
        want = self.cts_in_chunk(index)
        if items != want:
            raise InvalidMessage(Reason.CHUNK_MISMATCH, f"chunk {index} has {items} ciphertexts, "
                                 f"expected {want}")
        out, pos = [], 0
        for _ in range(items):
            if pos + LEN.size > len(body):
                raise InvalidMessage(Reason.TRUNCATED, "ciphertext list is cut short")
            (n,) = LEN.unpack_from(body, pos)
            pos += LEN.size
            if n != self.plan.ct_bytes:
                raise InvalidMessage(Reason.OVERSIZED if n > self.plan.ct_bytes else
                                     Reason.TRUNCATED, f"ciphertext of {n} bytes, the plan's are "
                                     f"{self.plan.ct_bytes}")
            if pos + n > len(body):
                raise InvalidMessage(Reason.TRUNCATED, "ciphertext is cut short")
            out.append(bytes(body[pos:pos + n]))
            pos += n
        if pos != len(body):
            raise InvalidMessage(Reason.CORRUPT, f"{len(body) - pos} stray bytes after "
                                 "ciphertexts")
        return Chunk(index, summands, items=out)

    def chunk_index(self, payload: bytes) -> int:
        """Chunk index from the header alone (cheap; :meth:`parse` checks the rest)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidMessage(Reason.CORRUPT, "payload must be bytes")
        if len(payload) > self.max_payload_bytes():
            raise InvalidMessage(Reason.OVERSIZED, f"payload of {len(payload)} bytes")
        try:
            reader = self._zd.stream_reader(bytes(payload))
            head = reader.read(HEADER.size)
        except zstandard.ZstdError as exc:
            raise InvalidMessage(Reason.CORRUPT, f"not a zstd frame: {exc}") from None
        if len(head) < HEADER.size:
            raise InvalidMessage(Reason.TRUNCATED, "payload shorter than its header")
        h = HEADER.unpack(head)
        if h[0] != MAGIC:
            raise InvalidMessage(Reason.BAD_MAGIC, f"magic {h[0]!r} is not {MAGIC!r}")
        if h[1] != VERSION:
            raise InvalidMessage(Reason.WRONG_VERSION,
                                 f"layout version {h[1]}, expected {VERSION}")
        if h[5] >= self.num_chunks:
            raise InvalidMessage(Reason.CHUNK_MISMATCH,
                                 f"chunk index {h[5]} >= {self.num_chunks}")
        return int(h[5])
