"""The update codec: clip -> weight -> quantize -> pack -> CKKS -> chunks -> zstd, and back.

Idea: every agent of a round quantizes with the same scale, so the integers it sends can be
summed exactly; lanes of integers are packed into the real *and* imaginary halves of CKKS slots
(one 4096-degree ciphertext = 2048 complex slots = 4096 reals x 3 lanes = 12,288 parameters at
8-bit / 64 summands) and added homomorphically without ever being decrypted. Only the total is
decrypted, rounded, unpacked and dequantized. See ``docs/codec.md`` for the derivation of the
limits and the byte layout.

Chunk payload (version 1) = one zstd frame (content size + xxhash64 checksum) of::

    header, 56 bytes, little-endian ("<4sBBBBIIQII8s16s"):
      magic b"FSUC" | version u8 = 1 | mode u8 (1 = CKKS, 2 = plain) | dtype u8 (plain: 1 int8,
      2 int16, 8 int64; CKKS: 0) | reserved u8 = 0 | chunk_index u32 | num_chunks u32 |
      num_params u64 | summands u32 (updates in this sum) | items u32 (ciphertexts or values) |
      plan digest 8 bytes (SHA-256 of the codec parameters and num_params) |
      HE fingerprint 16 bytes (first half of the SHA-256 fingerprint; zeros in plain mode)
    body, CKKS:  items x (u32 length | SEAL ciphertext serialization)
    body, plain: i64 weight sum (chunk 0 only, 0 elsewhere) | items x dtype values

CKKS value stream: reals ``r[0..R)`` with ``r[0]`` = weight (capped sample count) and
``r[1 + j]`` = packed lanes ``j*L .. j*L+L-1``; ciphertext ``t`` of the whole update holds reals
``4096 t .. 4096 t + 4095``, slot ``s`` = ``r[2s] + i r[2s+1]``; chunk ``c`` holds ciphertexts
``c*cts_per_chunk ..``. So the weight is the real part of slot 0 of ciphertext 0 of chunk 0.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from schemas import packing, quantize
from schemas.errors import InvalidMessage
from schemas.he import MAX_CT_BYTES, HEContext

MAGIC = b"FSUC"
VERSION = 1
MODE_CKKS = 1
MODE_PLAIN = 2
HEADER = struct.Struct("<4sBBBBIIQII8s16s")
_LEN = struct.Struct("<I")
_I64 = struct.Struct("<q")
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i1"), 2: np.dtype("<i2"),
                                     8: np.dtype("<i8")}
_ZSTD_LEVEL = 1
_SLACK = 1024                    # header + zstd framing allowance per chunk

#: Worst-slot std of the decoding error of ONE fresh public-key ciphertext, times the CKKS scale.
#: Measured (3 keys, 40 x 64-ciphertext sums): average slot 0.0036 * 8, worst slot 0.152 / 8 at
#: scale 2**17, i.e. 2,490 at unit scale. The noise is ``r0 + r1 * s`` (rounding after the special
#: prime division), so slots where the secret key's embedding ``|s(zeta_j)|`` is large are ~4x
#: noisier than average. Rounded up. Sums of S ciphertexts have sqrt(S) times this.
NOISE_AT_UNIT_SCALE = 2600.0
#: A sum is only accepted if its worst-slot noise std is <= 1/16: rounding margin 0.5 = 8 sigma.
MAX_NOISE_STD = 1.0 / 16.0
#: Measured: decoding breaks once a plaintext coefficient ``scale * (...)`` reaches q0/2 (~2**59).
#: The planner keeps a bound on every coefficient below q0 / (2 * 1.1).
OVERFLOW_MARGIN = 1.1
MAX_HE_SCALE = 2.0**30
MAX_LANES = 4


@dataclass(frozen=True)
class CodecParams:
    """Per-round codec parameters (they travel in the round task)."""

    bits: int = 8
    clip_l2: float = 1.0
    clip_coord: float = 0.05
    max_summands: int = 64
    weight_cap: int = 1024
    encrypted: bool = True
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        def bad(detail: str) -> InvalidMessage:
            return InvalidMessage("bad_params", detail)

        for name in ("bits", "max_summands", "weight_cap", "chunk_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(f"{name} must be an integer, got {v!r}")
        if not 2 <= self.bits <= 16:
            raise bad(f"bits must be in 2..16, got {self.bits}")
        for name in ("clip_l2", "clip_coord"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v <= 0:
                raise bad(f"{name} must be a positive finite number, got {v!r}")
        if not 1 <= self.max_summands <= 2**31 - 1:
            raise bad(f"max_summands must be in 1..2**31-1, got {self.max_summands}")
        if not 1 <= self.weight_cap <= 2**31 - 1:
            raise bad(f"weight_cap must be in 1..2**31-1, got {self.weight_cap}")
        if not 4096 <= self.chunk_bytes <= 1 << 30:
            raise bad(f"chunk_bytes must be in 4096..2**30, got {self.chunk_bytes}")
        if not isinstance(self.encrypted, bool):
            raise bad(f"encrypted must be a bool, got {self.encrypted!r}")

    @property
    def scale(self) -> float:
        """Quantization step: ``clip_coord / (2**(bits-1) - 1)``."""
        return self.clip_coord / quantize.qmax(self.bits)


@dataclass(frozen=True)
class Plan:
    """How a round's updates are laid out (derived from CodecParams, num_params and the ring).

    In plain mode ``lanes = 1``, ``lane_bits = 64``, ``values_per_ct = cts_per_chunk = 0``.
    ``params_per_chunk`` is nominal: CKKS chunk 0 holds ``lanes`` fewer (the weight real).
    """

    lanes: int
    lane_bits: int
    values_per_ct: int
    cts_per_chunk: int
    params_per_chunk: int
    num_chunks: int
    he_scale: float = 0.0        # CKKS encoding scale (0 in plain mode)
    reals_per_ct: int = 0        # 2 * slots (0 in plain mode)
    num_reals: int = 0           # R = 1 + ceil(num_params / lanes) (0 in plain mode)


def update_seed(base_seed: int, round_id: int, agent_id: str) -> int:
    """Deterministic 64-bit seed of one agent's quantization noise in one round (SHA-256)."""
    h = hashlib.sha256(f"fedstream/update-seed/v1|{int(base_seed)}|{int(round_id)}|{agent_id}"
                       .encode()).digest()
    return int.from_bytes(h[:8], "big")


def plan_ckks(params: CodecParams, num_params: int, q0: int, slots: int) -> Plan:
    """Choose lanes and CKKS scale so any sum of ``max_summands`` updates decodes exactly.

    Raises:
        InvalidMessage("unsummable_plan"): no lane count satisfies both the overflow bound
            ``sqrt(2) * Vmax * scale <= q0 / (2 * 1.25)`` and the noise bound
            ``800 * sqrt(S) / scale <= 1/16``.
    """
    s = params.max_summands
    width = packing.lane_bits(params.bits, s)
    reals_per_ct = 2 * slots
    min_scale = NOISE_AT_UNIT_SCALE * math.sqrt(s) / MAX_NOISE_STD
    for lanes in range(MAX_LANES, 0, -1):
        vmax = max(packing.packed_max(params.bits, s, lanes, width), s * params.weight_cap)
        bound = coefficient_bound(params, lanes, width, reals_per_ct)
        max_scale = min(q0 / (2 * OVERFLOW_MARGIN * bound), MAX_HE_SCALE)
        if max_scale < 1:
            continue
        he_scale = 2.0 ** (math.floor(4 * math.log2(max_scale)) / 4)   # quarter-bit grid
        if he_scale >= min_scale and vmax < 2**52:
            break
    else:
        raise InvalidMessage(
            "unsummable_plan",
            f"{params.bits}-bit values, {s} summands: a {width}-bit lane needs a CKKS scale "
            f">= {min_scale:.3g} for exact rounding but the 60-bit modulus allows less")
    reals_per_ct = 2 * slots
    ct_bytes = _LEN.size + MAX_CT_BYTES
    cts_per_chunk = max(1, (params.chunk_bytes - _SLACK) // ct_bytes)
    num_reals = 1 + -(-num_params // lanes)
    reals_per_chunk = cts_per_chunk * reals_per_ct
    return Plan(lanes=lanes, lane_bits=width, values_per_ct=reals_per_ct * lanes,
                cts_per_chunk=cts_per_chunk, params_per_chunk=reals_per_chunk * lanes,
                num_chunks=-(-num_reals // reals_per_chunk), he_scale=he_scale,
                reals_per_ct=reals_per_ct, num_reals=num_reals)


def ct_l2_bound(params: CodecParams, values_per_ct: int) -> float:
    """Bound on ``||q||_2`` over the values of one ciphertext of one update.

    ``||y||_2 <= clip_l2 / scale`` after clipping and weighting, and stochastic rounding moves
    each value by less than 1, so ``||q_ct||_2 <= clip_l2 / scale + sqrt(values_per_ct)``.
    """
    return params.clip_l2 / params.scale * (1 + 1e-9) + math.sqrt(values_per_ct)


def coefficient_bound(params: CodecParams, lanes: int, width: int, reals_per_ct: int) -> float:
    """Bound on ``|m_i| / scale`` for every coefficient of a summed plaintext.

    With slots ``z_j`` (N/2 of them), ``m_i = (2 scale / N) Re sum_j z_j zeta_j^-i``, so
    ``|m_i| / scale <= min(sqrt(2) max|z_j|, sqrt(2/N) ||reals||_2)`` (Cauchy-Schwarz). The first
    uses the per-coordinate bound (every lane sum ``<= M``), the second the L2 clip: a lane of a
    sum has ``||.||_2 <= min(S * ct_l2_bound, M sqrt(reals))``.
    """
    s = params.max_summands
    m = packing.lane_max(params.bits, s)
    vmax = max(packing.packed_max(params.bits, s, lanes, width), s * params.weight_cap)
    lane_l2 = min(s * ct_l2_bound(params, reals_per_ct * lanes), m * math.sqrt(reals_per_ct))
    reals_l2 = s * params.weight_cap + lane_l2 * sum(2.0 ** (width * k) for k in range(lanes))
    n = float(reals_per_ct)            # poly degree N: N/2 complex slots = N reals
    return min(math.sqrt(2) * vmax, math.sqrt(2 / n) * reals_l2)


def plan_plain(params: CodecParams, num_params: int) -> Plan:
    """Plain mode: ``params_per_chunk`` int64 sums fit in ``chunk_bytes``."""
    per = (params.chunk_bytes - _SLACK) // 8
    return Plan(lanes=1, lane_bits=64, values_per_ct=0, cts_per_chunk=0,
                params_per_chunk=per, num_chunks=-(-num_params // per))


@dataclass
class _Chunk:
    """A parsed chunk: header fields plus the body (ciphertext bytes list or int64 values)."""

    index: int
    summands: int
    items: list[bytes] | None = None      # CKKS: serialized ciphertexts
    values: np.ndarray | None = None      # plain: values (int8/int16/int64)
    weight: int = 0                        # plain: weight sum

    def cts(self) -> list[bytes]:
        """The serialized ciphertexts (CKKS chunks only)."""
        if self.items is None:
            raise InvalidMessage("wrong_mode", "chunk has no ciphertexts (plain chunk)")
        return self.items

    def ints(self) -> np.ndarray:
        """The plain values (plain chunks only)."""
        if self.values is None:
            raise InvalidMessage("wrong_mode", "chunk has no plain values (CKKS chunk)")
        return self.values


class Codec:
    """Encode, add and decode the updates of one round (see module docstring)."""

    def __init__(self, params: CodecParams, num_params: int,
                 context: HEContext | None = None) -> None:
        if not isinstance(params, CodecParams):
            raise InvalidMessage("bad_params", "params must be a CodecParams")
        if isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer)) \
                or not 1 <= num_params < 2**40:
            raise InvalidMessage("bad_params", f"num_params must be in 1..2**40, got {num_params}")
        self.params = params
        self.num_params = int(num_params)
        self.context = context
        if params.encrypted:
            if context is None:
                raise InvalidMessage("bad_params", "encrypted codec needs an HE context")
            seal = context.seal
            self.plan = plan_ckks(params, self.num_params, seal.q0, seal.slots)
            self._fp = bytes.fromhex(context.fingerprint)[:16]
            self._mode = MODE_CKKS
        else:
            self.plan = plan_plain(params, self.num_params)
            self._fp = bytes(16)
            self._mode = MODE_PLAIN
        self.num_chunks = self.plan.num_chunks
        self.scale = params.scale
        digest_src = repr((VERSION, params.bits, float(params.clip_l2), float(params.clip_coord),
                           params.max_summands, params.weight_cap, params.encrypted,
                           params.chunk_bytes, self.num_params)).encode()
        self._digest = hashlib.sha256(digest_src).digest()[:8]
        self._zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True,
                                            write_content_size=True)
        self._zd = zstandard.ZstdDecompressor()

    def _he(self) -> HEContext:
        """The HE context; only CKKS codecs have one (the constructor guarantees it)."""
        if self.context is None:
            raise InvalidMessage("bad_params", "encrypted codec needs an HE context")
        return self.context

    # ------------------------------------------------------------------ quantization

    def quantize_update(self, delta: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
        """``clip(delta) * min(num_samples, cap) / cap``, stochastically quantized (int64)."""
        x = quantize.check_finite(delta)
        if x.shape[0] != self.num_params:
            raise InvalidMessage("wrong_num_params",
                                 f"delta has {x.shape[0]} values, codec has {self.num_params}")
        w = self._weight(num_samples)
        p = self.params
        x = quantize.clip(x, p.clip_l2, p.clip_coord)
        if w != p.weight_cap:
            x *= w / p.weight_cap
        return quantize.quantize(x, self.scale, p.bits, seed)

    def _weight(self, num_samples: int) -> int:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples < 1:
            raise InvalidMessage("bad_weight", f"num_samples must be an int >= 1: {num_samples!r}")
        return int(min(int(num_samples), self.params.weight_cap))

    def average(self, qsum: np.ndarray, weight_sum: int) -> np.ndarray:
        """Weighted FedAvg delta (float32): ``qsum * scale * weight_cap / weight_sum``."""
        if weight_sum <= 0:
            raise InvalidMessage("zero_weight", f"weight sum must be positive, got {weight_sum}")
        factor = self.scale * self.params.weight_cap / float(weight_sum)
        return (np.asarray(qsum, dtype=np.float64) * factor).astype(np.float32)

    # ------------------------------------------------------------------ encode

    def encode(self, delta: np.ndarray, num_samples: int, seed: int) -> list[bytes]:
        """Quantize and encode one update into ``num_chunks`` payloads."""
        q = self.quantize_update(delta, num_samples, seed)
        return self._encode(q, self._weight(num_samples))

    def encode_quantized(self, q: np.ndarray, weight: int) -> list[bytes]:
        """Encode already-quantized integers (``|q| <= 2**(bits-1)-1``) with weight ``<= cap``."""
        q = np.asarray(q)
        if q.ndim != 1 or q.shape[0] != self.num_params:
            raise InvalidMessage("wrong_num_params", f"q has shape {q.shape}")
        if q.dtype.kind not in "iu":
            raise InvalidMessage("out_of_range", f"q must be integers, got {q.dtype}")
        bound = quantize.qmax(self.params.bits)
        if q.size and (int(q.max()) > bound or int(q.min()) < -bound):
            raise InvalidMessage("out_of_range", f"q exceeds +-{bound}")
        if self._mode == MODE_CKKS:
            vpc = self.plan.values_per_ct
            qf = np.zeros(-(-(q.shape[0] + self.plan.lanes) // vpc) * vpc)
            qf[self.plan.lanes:self.plan.lanes + q.shape[0]] = q
            norms = np.sqrt(np.einsum("ij,ij->i", qf.reshape(-1, vpc), qf.reshape(-1, vpc)))
            if float(norms.max()) > ct_l2_bound(self.params, vpc):
                raise InvalidMessage("out_of_range", "q exceeds the L2 clip bound of the plan")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) \
                or not 1 <= weight <= self.params.weight_cap:
            raise InvalidMessage("bad_weight", f"weight must be in 1..{self.params.weight_cap}")
        return self._encode(q.astype(np.int64), int(weight))

    def _encode(self, q: np.ndarray, weight: int) -> list[bytes]:
        if self._mode == MODE_PLAIN:
            dtype = 1 if self.params.bits <= 8 else 2
            per = self.plan.params_per_chunk
            out = []
            for c in range(self.num_chunks):
                vals = q[c * per:(c + 1) * per].astype(_DTYPES[dtype])
                out.append(self._frame(c, 1, dtype, vals.shape[0],
                                       [_I64.pack(weight if c == 0 else 0), vals.tobytes()]))
            return out
        plan, seal = self.plan, self._he().seal
        reals = np.empty(plan.num_reals, np.float64)
        reals[0] = weight
        reals[1:] = packing.pack(q, plan.lanes, plan.lane_bits)
        rpc = plan.cts_per_chunk * plan.reals_per_ct
        out = []
        for c in range(self.num_chunks):
            part = reals[c * rpc:(c + 1) * rpc]
            n_ct = -(-part.shape[0] // plan.reals_per_ct)
            buf = np.zeros(n_ct * plan.reals_per_ct, np.float64)
            buf[:part.shape[0]] = part
            z = buf.view(np.complex128).reshape(n_ct, -1)
            items = [seal.save(seal.encrypt(z[t].tolist(), plan.he_scale)) for t in range(n_ct)]
            out.append(self._frame_cts(c, 1, items))
        return out

    # ------------------------------------------------------------------ framing

    def _frame(self, index: int, summands: int, dtype: int, items: int,
               body: list[bytes]) -> bytes:
        head = HEADER.pack(MAGIC, VERSION, self._mode, dtype, 0, index, self.num_chunks,
                           self.num_params, summands, items, self._digest, self._fp)
        return self._zc.compress(b"".join([head, *body]))

    def _frame_cts(self, index: int, summands: int, items: list[bytes]) -> bytes:
        body = []
        for b in items:
            body.append(_LEN.pack(len(b)))
            body.append(b)
        return self._frame(index, summands, 0, len(items), body)

    def _cts_in_chunk(self, index: int) -> int:
        plan = self.plan
        rpc = plan.cts_per_chunk * plan.reals_per_ct
        reals = min(rpc, plan.num_reals - index * rpc)
        return -(-reals // plan.reals_per_ct)

    def _values_in_chunk(self, index: int) -> int:
        per = self.plan.params_per_chunk
        return min(per, self.num_params - index * per)

    def _max_content(self) -> int:
        if self._mode == MODE_CKKS:
            return HEADER.size + self.plan.cts_per_chunk * (_LEN.size + MAX_CT_BYTES)
        return HEADER.size + 8 + 8 * self.plan.params_per_chunk

    def max_payload_bytes(self) -> int:
        """Largest payload this codec accepts (bigger ones are refused as "oversized")."""
        m = self._max_content()
        return m + m // 64 + 1024

    def _unframe(self, payload: bytes) -> tuple[tuple, memoryview]:
        """Check size, zstd frame and checksum, and the header; return (header fields, body)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidMessage("corrupt", f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > self.max_payload_bytes():
            raise InvalidMessage("oversized", f"payload of {len(payload)} bytes exceeds "
                                 f"{self.max_payload_bytes()}")
        if len(payload) < 18:
            raise InvalidMessage("truncated", f"payload of {len(payload)} bytes is too short")
        try:
            size = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise InvalidMessage("corrupt", f"not a zstd frame: {exc}") from None
        if size < 0:
            raise InvalidMessage("corrupt", "zstd frame does not declare its content size")
        if size > self._max_content():
            raise InvalidMessage("oversized", f"payload decompresses to {size} bytes, more than "
                                 f"{self._max_content()}")
        try:
            raw = self._zd.decompress(payload, max_output_size=self._max_content(),
                                      allow_extra_data=False)
        except zstandard.ZstdError as exc:
            msg = str(exc)
            if "full frame" in msg or "incomplete" in msg or "truncated" in msg:
                raise InvalidMessage("truncated", f"zstd frame is cut short: {msg}") from None
            raise InvalidMessage("corrupt", f"zstd frame is damaged: {msg}") from None
        if len(raw) < HEADER.size:
            raise InvalidMessage("truncated", "payload shorter than its header")
        h = HEADER.unpack_from(raw)
        magic, version, mode, dtype, _res, index, num_chunks, num_params, summands, items, \
            digest, fp = h
        if magic != MAGIC:
            raise InvalidMessage("bad_magic", f"magic {magic!r} is not {MAGIC!r}")
        if version != VERSION:
            raise InvalidMessage("wrong_version", f"layout version {version}, expected {VERSION}")
        if mode != self._mode:
            raise InvalidMessage("wrong_mode", f"payload mode {mode}, codec mode {self._mode}")
        if num_params != self.num_params:
            raise InvalidMessage("wrong_num_params",
                                 f"payload for {num_params} params, codec has {self.num_params}")
        if fp != self._fp:
            raise InvalidMessage("wrong_fingerprint",
                                 f"payload made under HE context {fp.hex()}, expected "
                                 f"{self._fp.hex()}")
        if digest != self._digest:
            raise InvalidMessage("plan_mismatch", "payload made with other codec parameters")
        if num_chunks != self.num_chunks or index >= num_chunks:
            raise InvalidMessage("chunk_mismatch",
                                 f"chunk {index} of {num_chunks}, codec has {self.num_chunks}")
        if not 1 <= summands <= self.params.max_summands:
            raise InvalidMessage("too_many_summands",
                                 f"payload sums {summands} updates, limit "
                                 f"{self.params.max_summands}")
        return h, memoryview(raw)[HEADER.size:]

    def _parse(self, payload: bytes) -> _Chunk:
        h, body = self._unframe(payload)
        index, summands, items, dtype = h[5], h[8], h[9], h[3]
        if self._mode == MODE_PLAIN:
            if dtype not in _DTYPES:
                raise InvalidMessage("corrupt", f"unknown value type {dtype}")
            want = self._values_in_chunk(index)
            if items != want:
                raise InvalidMessage("chunk_mismatch", f"chunk {index} has {items} values, "
                                     f"expected {want}")
            if len(body) != 8 + items * _DTYPES[dtype].itemsize:
                raise InvalidMessage("truncated", "plain chunk body has the wrong length")
            (weight,) = _I64.unpack_from(body)
            vals = np.frombuffer(body, _DTYPES[dtype], items, 8)
            return _Chunk(index, summands, values=vals, weight=weight)
        want = self._cts_in_chunk(index)
        if items != want:
            raise InvalidMessage("chunk_mismatch", f"chunk {index} has {items} ciphertexts, "
                                 f"expected {want}")
        out, pos = [], 0
        for _ in range(items):
            if pos + _LEN.size > len(body):
                raise InvalidMessage("truncated", "ciphertext list is cut short")
            (n,) = _LEN.unpack_from(body, pos)
            pos += _LEN.size
            if n > MAX_CT_BYTES:
                raise InvalidMessage("oversized", f"ciphertext of {n} bytes")
            if pos + n > len(body):
                raise InvalidMessage("truncated", "ciphertext is cut short")
            out.append(bytes(body[pos:pos + n]))
            pos += n
        if pos != len(body):
            raise InvalidMessage("corrupt", f"{len(body) - pos} stray bytes after ciphertexts")
        return _Chunk(index, summands, items=out)

    def chunk_index(self, payload: bytes) -> int:
        """Chunk index from the header (reads only the header; add/decode verify the rest)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidMessage("corrupt", "payload must be bytes")
        if len(payload) > self.max_payload_bytes():
            raise InvalidMessage("oversized", f"payload of {len(payload)} bytes")
        try:
            reader = self._zd.stream_reader(bytes(payload))
            head = reader.read(HEADER.size)
        except zstandard.ZstdError as exc:
            raise InvalidMessage("corrupt", f"not a zstd frame: {exc}") from None
        if len(head) < HEADER.size:
            raise InvalidMessage("truncated", "payload shorter than its header")
        h = HEADER.unpack(head)
        if h[0] != MAGIC:
            raise InvalidMessage("bad_magic", f"magic {h[0]!r} is not {MAGIC!r}")
        if h[1] != VERSION:
            raise InvalidMessage("wrong_version", f"layout version {h[1]}, expected {VERSION}")
        if h[5] >= self.num_chunks:
            raise InvalidMessage("chunk_mismatch", f"chunk index {h[5]} >= {self.num_chunks}")
        return int(h[5])

    # ------------------------------------------------------------------ add

    def add(self, a: bytes, b: bytes) -> bytes:
        """Sum two payloads of the same chunk index (public context suffices)."""
        acc = self.accumulator()
        ia = acc.add(a)
        ib = self._parse(b).index
        if ia != ib:
            raise InvalidMessage("chunk_mismatch", f"cannot add chunk {ia} to chunk {ib}")
        acc.add(b)
        return acc.payload(ia)

    def accumulator(self) -> Accumulator:
        """A running sum that keeps chunks deserialized (memory bounded by one model)."""
        return Accumulator(self)

    # ------------------------------------------------------------------ decode

    def decode(self, chunks: list[bytes]) -> tuple[np.ndarray, int]:
        """Exact int64 sums of the quantized updates and the sum of weights.

        Raises:
            InvalidMessage: "no_secret_key" with a public context, "chunk_mismatch" when chunks
                are missing, repeated or hold different numbers of summands, "inexact_sum" when
                the decrypted values are not integers (overflow or damage), plus every reason of
                payload parsing.
        """
        if self._mode == MODE_CKKS and not self._he().is_private:
            raise InvalidMessage("no_secret_key", "this HE context cannot decrypt")
        if len(chunks) != self.num_chunks:
            raise InvalidMessage("chunk_mismatch",
                                 f"{len(chunks)} chunks given, {self.num_chunks} expected")
        parsed: dict[int, _Chunk] = {}
        for p in chunks:
            ch = self._parse(p)
            if ch.index in parsed:
                raise InvalidMessage("chunk_mismatch", f"chunk {ch.index} given twice")
            parsed[ch.index] = ch
        summands = {ch.summands for ch in parsed.values()}
        if len(summands) != 1:
            raise InvalidMessage("chunk_mismatch", f"chunks sum different counts {summands}")
        (count,) = summands
        if self._mode == MODE_PLAIN:
            qsum = np.concatenate([parsed[c].ints().astype(np.int64)
                                   for c in range(self.num_chunks)])
            weight = parsed[0].weight
            if any(parsed[c].weight for c in range(1, self.num_chunks)):
                raise InvalidMessage("corrupt", "weight outside chunk 0")
        else:
            qsum, weight = self._decrypt(parsed, count)
        if not count <= weight <= count * self.params.weight_cap:
            raise InvalidMessage("inexact_sum", f"weight sum {weight} impossible for {count} "
                                 "updates")
        bound = count * quantize.qmax(self.params.bits)
        if qsum.size and int(np.abs(qsum).max()) > bound:
            raise InvalidMessage("inexact_sum", "a sum exceeds summands * 2**(bits-1)-1")
        return qsum, int(weight)

    def _decrypt(self, parsed: dict[int, _Chunk], count: int) -> tuple[np.ndarray, int]:
        plan, seal = self.plan, self._he().seal
        reals = np.empty(sum(len(parsed[c].cts()) for c in parsed) * plan.reals_per_ct)
        pos = 0
        for c in range(self.num_chunks):
            for item in parsed[c].cts():
                z = np.array(seal.decrypt(seal.load(item, plan.he_scale)), np.complex128)
                reals[pos:pos + plan.reals_per_ct] = z.view(np.float64)
                pos += plan.reals_per_ct
        reals = reals[:plan.num_reals]
        rounded = np.rint(reals)
        if float(np.abs(reals - rounded).max()) > 0.375:
            raise InvalidMessage("inexact_sum", "decrypted values are not integers: wrong key, "
                                 "overflow or damaged ciphertext")
        ints = rounded.astype(np.int64)
        vmax = packing.packed_max(self.params.bits, count, plan.lanes, plan.lane_bits)
        if int(np.abs(ints[1:]).max(initial=0)) > vmax:
            raise InvalidMessage("inexact_sum", "a packed sum exceeds its lane bound")
        return packing.unpack(ints[1:], plan.lanes, plan.lane_bits, self.num_params), int(ints[0])


class Accumulator:
    """Running homomorphic (or int64) sum of chunk payloads, kept deserialized.

    ``add`` deserializes one payload and adds it into the running sum of its chunk index;
    ``payload(i)`` / ``payloads()`` serialize the sums again. Use this in aggregators: adding an
    update costs one deserialize and one add per ciphertext, no re-serialization.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.sums: dict[int, list] = {}
        self.summands: dict[int, int] = {}
        self.weights: dict[int, int] = {}

    def add(self, payload: bytes) -> int:
        """Add one payload into the sum of its chunk; return the chunk index."""
        codec = self.codec
        ch = codec._parse(payload)
        total = self.summands.get(ch.index, 0) + ch.summands
        if total > codec.params.max_summands:
            raise InvalidMessage("too_many_summands", f"sum would hold {total} updates, limit "
                                 f"{codec.params.max_summands}")
        if codec._mode == MODE_PLAIN:
            vals = ch.ints().astype(np.int64)
            if ch.index in self.sums:
                self.sums[ch.index][0] += vals
                self.weights[ch.index] += ch.weight
            else:
                self.sums[ch.index] = [vals]
                self.weights[ch.index] = ch.weight
        else:
            seal, scale = codec._he().seal, codec.plan.he_scale
            cts = [seal.load(b, scale) for b in ch.cts()]
            if ch.index in self.sums:
                for acc, ct in zip(self.sums[ch.index], cts):
                    seal.evaluator.add_inplace(acc, ct)
            else:
                self.sums[ch.index] = cts
        self.summands[ch.index] = total
        return ch.index

    def payload(self, index: int) -> bytes:
        """The running sum of chunk ``index`` as a payload."""
        codec = self.codec
        if index not in self.sums:
            raise InvalidMessage("chunk_mismatch", f"no sum for chunk {index}")
        n = self.summands[index]
        if codec._mode == MODE_PLAIN:
            vals = self.sums[index][0]
            return codec._frame(index, n, 8, vals.shape[0],
                                [_I64.pack(self.weights[index]), vals.astype("<i8").tobytes()])
        seal = codec._he().seal
        return codec._frame_cts(index, n, [seal.save(ct) for ct in self.sums[index]])

    def payloads(self) -> list[bytes]:
        """Payloads of every chunk summed so far, in chunk order."""
        return [self.payload(i) for i in sorted(self.sums)]
